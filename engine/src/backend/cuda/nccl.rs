//! NCCL collectives between GPUs, run on each rank's backend stream so they order with its
//! kernels. Ranks may be threads of one process ([`NcclCollective::group`]) or processes
//! that share the 128-byte unique id of rank 0 ([`NcclCollective::join`]).

use std::sync::{Mutex, PoisonError};

use cudarc::driver::CudaSlice;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{CudaBackend, CudaTensor, device_error};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::parallel::{Collective, collective_error};

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// Whether libnccl can be loaded here.
pub fn nccl_probe() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen libnccl.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libnccl not found".into())
    }
}

fn nccl_error(what: &str, error: impl std::fmt::Debug) -> EngineError {
    collective_error(format!("nccl {what}: {error:?}"))
}

/// A fresh unique id for a new group: rank 0 makes it and hands it to the other ranks.
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    nccl_probe().map_err(|reason| EngineError::DeviceUnavailable {
        device: "nccl".into(),
        reason,
    })?;
    let id = Id::new().map_err(|e| nccl_error("making a unique id", e))?;
    Ok(id.internal().map(|c| c as u8))
}

/// A communicator that may move between threads.
struct SharedComm(Comm);

// SAFETY: an NCCL communicator is not tied to the thread that made it; the Mutex around it
// lets one thread at a time issue calls, as NCCL requires.
unsafe impl Send for SharedComm {}

/// One rank's NCCL communicator, created once and reused for every collective.
pub struct NcclCollective {
    comm: Mutex<SharedComm>,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl NcclCollective {
    /// Joins group `id` as rank `rank` of `size` on `backend`'s GPU and stream. Blocks until
    /// every rank has joined.
    pub fn join(
        backend: &CudaBackend,
        rank: usize,
        size: usize,
        id: [u8; NCCL_ID_BYTES],
    ) -> Result<Self> {
        nccl_probe().map_err(|reason| EngineError::DeviceUnavailable {
            device: "nccl".into(),
            reason,
        })?;
        backend
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| device_error("binding the device", e))?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(backend.stream.clone(), rank, size, id)
            .map_err(|e| nccl_error("joining the group", e))?;
        Ok(Self {
            comm: Mutex::new(SharedComm(comm)),
            rank,
            size,
        })
    }

    /// One communicator per backend, rank r on `backends[r]`: the ranks of one process.
    pub fn group(backends: &[CudaBackend]) -> Result<Vec<Self>> {
        let id = nccl_unique_id()?;
        let size = backends.len();
        std::thread::scope(|s| {
            let joining: Vec<_> = backends
                .iter()
                .enumerate()
                .map(|(rank, backend)| s.spawn(move || Self::join(backend, rank, size, id)))
                .collect();
            joining
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(collective_error("joining panicked".into())))
                })
                .collect()
        })
    }

    fn with_comm<T>(&self, f: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
        let comm = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        f(&comm.0)
    }

    /// Each rank's `send_counts`, row r being rank r's.
    fn counts_matrix(&self, b: &CudaBackend, send_counts: &[usize]) -> Result<Vec<u64>> {
        let counts: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let counts = b.upload(&counts)?;
        let mut all = b.uninit::<u64>(self.size * self.size)?;
        self.with_comm(|c| {
            c.all_gather(&counts.slice(0..self.size), &mut all)
                .map_err(|e| nccl_error("all_gather", e))
        })?;
        b.stream
            .clone_dtoh(&all)
            .map_err(|e| device_error("copying to the host", e))
    }
}

fn len(x: &CudaTensor) -> usize {
    x.rows * x.cols
}

impl Collective<CudaBackend> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, _b: &CudaBackend, x: &mut CudaTensor) -> Result<()> {
        let n = len(x);
        if n == 0 {
            return Ok(());
        }
        self.with_comm(|c| {
            c.all_reduce_in_place(&mut x.values_mut().slice_mut(0..n), &ReduceOp::Sum)
                .map(drop)
                .map_err(|e| nccl_error("all_reduce", e))
        })
    }

    fn all_gather(&self, b: &CudaBackend, x: &CudaTensor) -> Result<CudaTensor> {
        let n = len(x);
        let mut out = b.output(x.rows * self.size, x.cols)?;
        if n > 0 {
            self.with_comm(|c| {
                c.all_gather(
                    &x.data.slice(0..n),
                    &mut out.data.slice_mut(0..n * self.size),
                )
                .map(drop)
                .map_err(|e| nccl_error("all_gather", e))
            })?;
        }
        Ok(out)
    }

    fn all_to_all_v(
        &self,
        b: &CudaBackend,
        x: &CudaTensor,
        send_rows: &[usize],
    ) -> Result<(CudaTensor, Vec<usize>)> {
        if send_rows.len() != self.size || send_rows.iter().sum::<usize>() != x.rows {
            return Err(collective_error(format!(
                "all-to-all sends {send_rows:?} rows of a tensor with {} to {} ranks",
                x.rows, self.size
            )));
        }
        let matrix = self.counts_matrix(b, send_rows)?;
        let recv_rows: Vec<usize> = (0..self.size)
            .map(|r| matrix[r * self.size + self.rank] as usize)
            .collect();
        let cols = x.cols;
        // Each peer's rows land in their own buffer (views into one buffer cannot all be
        // borrowed mutably at once), then are packed in rank order.
        let mut parts: Vec<CudaSlice<f32>> = recv_rows
            .iter()
            .map(|&n| b.uninit::<f32>(n * cols))
            .collect::<Result<_>>()?;
        self.with_comm(|c| {
            let mut group = c.group();
            let mut start = 0;
            for (peer, (&sent, part)) in send_rows.iter().zip(parts.iter_mut()).enumerate() {
                if sent > 0 {
                    let view = x.data.slice(start * cols..(start + sent) * cols);
                    group
                        .send(view, peer as i32)
                        .map_err(|e| nccl_error("send", e))?;
                }
                start += sent;
                let expected = recv_rows[peer] * cols;
                if expected > 0 {
                    group
                        .recv(part.slice_mut(0..expected), peer as i32)
                        .map_err(|e| nccl_error("recv", e))?;
                }
            }
            Ok(())
        })?;
        let total: usize = recv_rows.iter().sum();
        let mut out = b.output(total, cols)?;
        let mut start = 0;
        for (part, &n) in parts.iter().zip(&recv_rows) {
            if n > 0 {
                b.stream
                    .memcpy_dtod(
                        &part.slice(0..n * cols),
                        &mut out.data.slice_mut(start * cols..(start + n) * cols),
                    )
                    .map_err(|e| device_error("packing received rows", e))?;
            }
            start += n;
        }
        Ok((out, recv_rows))
    }

    fn send(&self, _b: &CudaBackend, x: &CudaTensor, to: usize) -> Result<()> {
        let n = len(x);
        self.with_comm(|c| {
            c.send(&x.data.slice(0..n), to as i32)
                .map_err(|e| nccl_error("send", e))
        })
    }

    fn recv(&self, b: &CudaBackend, from: usize, rows: usize, cols: usize) -> Result<CudaTensor> {
        let mut out = b.output(rows, cols)?;
        self.with_comm(|c| {
            c.recv(&mut out.data.slice_mut(0..rows * cols), from as i32)
                .map(drop)
                .map_err(|e| nccl_error("recv", e))
        })?;
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        self.with_comm(|c| {
            let stream = c.stream();
            let mut flag = stream
                .alloc_zeros::<f32>(1)
                .map_err(|e| device_error("allocating", e))?;
            c.all_reduce_in_place(&mut flag, &ReduceOp::Sum)
                .map_err(|e| nccl_error("barrier", e))?;
            stream
                .synchronize()
                .map_err(|e| device_error("synchronizing", e))
        })
    }

    fn all_to_all_host(&self, b: &CudaBackend, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let counts: Vec<usize> = send.iter().map(Vec::len).collect();
        let flat = send.concat();
        let x = b.upload_tensor(flat.len(), 1, flat)?;
        let (received, received_counts) = self.all_to_all_v(b, &x, &counts)?;
        let mut values = b.to_host(&received)?.into_iter();
        Ok(received_counts
            .iter()
            .map(|&n| values.by_ref().take(n).collect())
            .collect())
    }

    fn all_gather_host(&self, b: &CudaBackend, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.all_to_all_host(b, vec![x.to_vec(); self.size])
    }
}
