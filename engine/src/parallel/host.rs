//! Collectives among ranks that are threads of one process, over channels: what CI and
//! CPU-only hosts run, and the reference the NCCL path is checked against.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use crate::backend::Backend;
use crate::error::Result;
use crate::parallel::{Collective, collective_error};

/// How long a rank waits for a peer's part of a collective before failing it. Ranks run the
/// same steps in lockstep, so a long wait means a peer is stuck or gone.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// What one peer sent this rank, in order.
type Inbox = Mutex<Receiver<Vec<f32>>>;

/// A group of `size` host-connected ranks, boxed for any backend.
pub(crate) fn host_collectives<B: Backend>(
    size: usize,
    timeout: Duration,
) -> Vec<Box<dyn Collective<B>>> {
    HostCollective::group(size, timeout)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Collective<B>>)
        .collect()
}

/// One rank's end of a group of channel-connected ranks.
pub struct HostCollective {
    rank: usize,
    /// `to[r]` delivers to rank r (None for this rank).
    to: Vec<Option<Sender<Vec<f32>>>>,
    /// `from[r]` holds what rank r sent here, in order.
    from: Vec<Option<Inbox>>,
    timeout: Duration,
}

impl std::fmt::Debug for HostCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollective")
            .field("rank", &self.rank)
            .field("size", &self.to.len())
            .finish_non_exhaustive()
    }
}

impl HostCollective {
    /// A group of `size` connected ranks; hand element r to the thread running rank r.
    pub fn group(size: usize, timeout: Duration) -> Vec<Self> {
        let mut to: Vec<Vec<Option<Sender<Vec<f32>>>>> = (0..size)
            .map(|_| (0..size).map(|_| None).collect())
            .collect();
        let mut from: Vec<Vec<Option<Inbox>>> = (0..size)
            .map(|_| (0..size).map(|_| None).collect())
            .collect();
        for src in 0..size {
            for dst in (0..size).filter(|&d| d != src) {
                let (tx, rx) = channel();
                to[src][dst] = Some(tx);
                from[dst][src] = Some(Mutex::new(rx));
            }
        }
        to.into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| Self {
                rank,
                to,
                from,
                timeout,
            })
            .collect()
    }

    fn put(&self, to: usize, data: Vec<f32>) -> Result<()> {
        let link = self.to.get(to).and_then(Option::as_ref).ok_or_else(|| {
            collective_error(format!("rank {} has no link to rank {to}", self.rank))
        })?;
        link.send(data)
            .map_err(|_| collective_error(format!("rank {to} left the group")))
    }

    fn take(&self, from: usize) -> Result<Vec<f32>> {
        let link = self
            .from
            .get(from)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                collective_error(format!("rank {} has no link from rank {from}", self.rank))
            })?;
        let receiver = link
            .lock()
            .map_err(|_| collective_error("a collective panicked".into()))?;
        receiver.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => collective_error(format!(
                "rank {} heard nothing from rank {from} within {:?}",
                self.rank, self.timeout
            )),
            RecvTimeoutError::Disconnected => {
                collective_error(format!("rank {from} left the group"))
            }
        })
    }

    /// Sends `parts[r]` to every other rank r and returns every rank's part for this one, in
    /// rank order (this rank's own part passes through).
    fn exchange(&self, mut parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let size = self.to.len();
        if parts.len() != size {
            return Err(collective_error(format!(
                "{} parts for a group of {size}",
                parts.len()
            )));
        }
        let own = std::mem::take(&mut parts[self.rank]);
        for (r, part) in parts.into_iter().enumerate() {
            if r != self.rank {
                self.put(r, part)?;
            }
        }
        let mut received = (0..self.rank)
            .map(|r| self.take(r))
            .collect::<Result<Vec<_>>>()?;
        received.push(own);
        for r in self.rank + 1..size {
            received.push(self.take(r)?);
        }
        Ok(received)
    }

    fn broadcast_own(&self, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.exchange(vec![x.to_vec(); self.to.len()])
    }
}

impl<B: Backend> Collective<B> for HostCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn all_reduce_sum(&self, backend: &B, x: &mut B::Tensor) -> Result<()> {
        let (rows, cols) = backend.shape(x);
        let parts = self.broadcast_own(&backend.to_host(x)?)?;
        let mut sum = vec![0.0f32; rows * cols];
        for part in &parts {
            if part.len() != sum.len() {
                return Err(collective_error(format!(
                    "all-reduce of {} values met a part of {}",
                    sum.len(),
                    part.len()
                )));
            }
            for (s, v) in sum.iter_mut().zip(part) {
                *s += v;
            }
        }
        *x = backend.upload_tensor(rows, cols, sum)?;
        Ok(())
    }

    fn all_gather(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let (_, cols) = backend.shape(x);
        let all: Vec<f32> = self.broadcast_own(&backend.to_host(x)?)?.concat();
        backend.upload_tensor(all.len() / cols.max(1), cols, all)
    }

    fn all_to_all_v(
        &self,
        backend: &B,
        x: &B::Tensor,
        send_rows: &[usize],
    ) -> Result<(B::Tensor, Vec<usize>)> {
        let (rows, cols) = backend.shape(x);
        if send_rows.iter().sum::<usize>() != rows {
            return Err(collective_error(format!(
                "all-to-all sends {send_rows:?} rows of a tensor with {rows}"
            )));
        }
        let host = backend.to_host(x)?;
        let mut parts = Vec::with_capacity(send_rows.len());
        let mut start = 0;
        for &n in send_rows {
            parts.push(host[start * cols..(start + n) * cols].to_vec());
            start += n;
        }
        let received = self.exchange(parts)?;
        let counts = received.iter().map(|p| p.len() / cols.max(1)).collect();
        let all = received.concat();
        Ok((
            backend.upload_tensor(all.len() / cols.max(1), cols, all)?,
            counts,
        ))
    }

    fn send(&self, backend: &B, x: &B::Tensor, to: usize) -> Result<()> {
        self.put(to, backend.to_host(x)?)
    }

    fn recv(&self, backend: &B, from: usize, rows: usize, cols: usize) -> Result<B::Tensor> {
        let data = self.take(from)?;
        if data.len() != rows * cols {
            return Err(collective_error(format!(
                "expected [{rows}, {cols}] from rank {from}, got {} values",
                data.len()
            )));
        }
        backend.upload_tensor(rows, cols, data)
    }

    fn barrier(&self) -> Result<()> {
        self.broadcast_own(&[]).map(|_| ())
    }

    fn all_to_all_host(&self, _: &B, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        self.exchange(send)
    }

    fn all_gather_host(&self, _: &B, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.broadcast_own(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{CpuBackend, CpuTensor};

    /// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
    fn on_ranks<T: Send>(size: usize, f: impl Fn(usize, &HostCollective) -> T + Sync) -> Vec<T> {
        let comms = HostCollective::group(size, Duration::from_secs(10));
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .enumerate()
                .map(|(rank, comm)| {
                    let f = &f;
                    s.spawn(move || f(rank, comm))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn tensor(rows: usize, cols: usize, data: Vec<f32>) -> CpuTensor {
        CpuTensor { rows, cols, data }
    }

    #[test]
    fn all_reduce_gives_every_rank_the_same_sum() {
        let results = on_ranks(4, |rank, comm| {
            let mut x = tensor(1, 3, vec![rank as f32, 1.0, 0.1 * rank as f32]);
            Collective::<CpuBackend>::all_reduce_sum(comm, &CpuBackend, &mut x).unwrap();
            x.data
        });
        for r in &results {
            assert_eq!(r, &results[0], "ranks must agree bit for bit");
        }
        assert_eq!(results[0][..2], [6.0, 4.0]);
        assert!((results[0][2] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn all_to_all_v_routes_rows_by_destination() {
        // Rank r sends d + 1 rows to rank d, each row holding [r, d].
        let results = on_ranks(3, |rank, comm| {
            let counts: Vec<usize> = (0..3).map(|d| d + 1).collect();
            let data: Vec<f32> = (0..3)
                .flat_map(|d| (0..=d).flat_map(move |_| [rank as f32, d as f32]))
                .collect();
            let x = tensor(6, 2, data);
            Collective::<CpuBackend>::all_to_all_v(comm, &CpuBackend, &x, &counts).unwrap()
        });
        for (rank, (got, counts)) in results.iter().enumerate() {
            assert_eq!(counts, &vec![rank + 1; 3]);
            let expected: Vec<f32> = (0..3)
                .flat_map(|src| (0..=rank).flat_map(move |_| [src as f32, rank as f32]))
                .collect();
            assert_eq!(got.data, expected);
        }
    }

    #[test]
    fn gather_send_recv_and_barrier() {
        let results = on_ranks(2, |rank, comm| {
            let x = tensor(1, 2, vec![rank as f32; 2]);
            let gathered = Collective::<CpuBackend>::all_gather(comm, &CpuBackend, &x).unwrap();
            let peer = 1 - rank;
            Collective::<CpuBackend>::send(comm, &CpuBackend, &x, peer).unwrap();
            let got = Collective::<CpuBackend>::recv(comm, &CpuBackend, peer, 1, 2).unwrap();
            Collective::<CpuBackend>::barrier(comm).unwrap();
            (gathered.data, got.data)
        });
        assert_eq!(results[0].0, vec![0.0, 0.0, 1.0, 1.0]);
        assert_eq!(results[0].1, vec![1.0, 1.0]);
        assert_eq!(results[1].1, vec![0.0, 0.0]);
    }

    #[test]
    fn a_rank_that_leaves_fails_its_peers_instead_of_hanging() {
        let mut comms = HostCollective::group(2, Duration::from_secs(10));
        drop(comms.pop());
        let err = Collective::<CpuBackend>::barrier(&comms[0]).unwrap_err();
        assert!(err.to_string().contains("rank 1 left the group"), "{err}");
    }

    #[test]
    fn a_silent_rank_times_out() {
        let comms = HostCollective::group(2, Duration::from_millis(50));
        let err =
            Collective::<CpuBackend>::all_gather_host(&comms[0], &CpuBackend, &[1.0]).unwrap_err();
        assert!(
            err.to_string().contains("heard nothing from rank 1"),
            "{err}"
        );
    }
}
