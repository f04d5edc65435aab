//! Worker pools, each worker's admin state, and the load-aware choice between the workers that
//! take new requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use tandem_proto::internal::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

/// What an SRE has asked of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminState {
    /// Takes new requests.
    Ready = 0,
    /// Takes no new requests.
    Cordoned = 1,
    /// Takes no new requests, and an SRE is waiting for it to finish the ones it has.
    Draining = 2,
}

/// One worker as this router sees it.
#[derive(Debug)]
pub(crate) struct Worker<C> {
    pub(crate) id: String,
    pub(crate) addr: String,
    pub(crate) model: String,
    pub(crate) device: String,
    pub(crate) client: C,
    /// For `Stats`.
    pub(crate) info: WorkerClient<Channel>,
    state: AtomicU8,
    /// Load in flight from this router, in the pool's unit (prompt tokens for prefill,
    /// sequences for decode).
    load: AtomicUsize,
    /// Requests in flight from this router.
    requests: AtomicUsize,
    /// The last `tokens_total` seen and when, for a tokens/s figure.
    pub(crate) last_sample: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

/// How to reach one worker, as learned at startup.
pub(crate) struct WorkerEntry<C> {
    pub(crate) id: String,
    pub(crate) addr: String,
    pub(crate) model: String,
    pub(crate) device: String,
    pub(crate) client: C,
    pub(crate) info: WorkerClient<Channel>,
}

/// Workers of one role.
#[derive(Debug)]
pub(crate) struct Pool<C> {
    workers: Vec<Arc<Worker<C>>>,
    /// Where the scan for the least loaded worker starts, so ties rotate.
    next: AtomicUsize,
}

/// A worker chosen for one request; its load is released when the lease drops.
#[derive(Debug)]
pub(crate) struct Lease<C> {
    worker: Arc<Worker<C>>,
    cost: usize,
}

impl<C> Worker<C> {
    pub(crate) fn state(&self) -> AdminState {
        match self.state.load(Ordering::Relaxed) {
            0 => AdminState::Ready,
            1 => AdminState::Cordoned,
            _ => AdminState::Draining,
        }
    }

    pub(crate) fn set_state(&self, state: AdminState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub(crate) fn requests_in_flight(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl<C> Pool<C> {
    pub(crate) fn new(workers: impl IntoIterator<Item = WorkerEntry<C>>) -> Self {
        Self {
            workers: workers
                .into_iter()
                .map(|e| {
                    Arc::new(Worker {
                        id: e.id,
                        addr: e.addr,
                        model: e.model,
                        device: e.device,
                        client: e.client,
                        info: e.info,
                        state: AtomicU8::new(AdminState::Ready as u8),
                        load: AtomicUsize::new(0),
                        requests: AtomicUsize::new(0),
                        last_sample: std::sync::Mutex::new(None),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub(crate) fn workers(&self) -> impl Iterator<Item = &Arc<Worker<C>>> {
        self.workers.iter()
    }

    pub(crate) fn find(&self, id: &str) -> Option<&Arc<Worker<C>>> {
        self.workers.iter().find(|w| w.id == id)
    }

    /// The ready worker with the least load, ties going round-robin, charged `cost` until the
    /// lease drops. None when no worker takes new requests.
    pub(crate) fn pick(&self, cost: usize) -> Option<Lease<C>> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let worker = (0..n)
            .map(|i| &self.workers[(start + i) % n])
            .filter(|w| w.state() == AdminState::Ready)
            .min_by_key(|w| w.load.load(Ordering::Relaxed))?;
        worker.load.fetch_add(cost, Ordering::Relaxed);
        worker.requests.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            worker: Arc::clone(worker),
            cost,
        })
    }
}

impl<C> Lease<C> {
    pub(crate) fn worker(&self) -> &Worker<C> {
        &self.worker
    }
}

impl<C> Drop for Lease<C> {
    fn drop(&mut self) {
        self.worker.load.fetch_sub(self.cost, Ordering::Relaxed);
        self.worker.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ids: &[&str]) -> Pool<()> {
        let channel = Channel::from_static("http://127.0.0.1:1").connect_lazy();
        Pool::new(ids.iter().map(|id| WorkerEntry {
            id: (*id).to_owned(),
            addr: String::new(),
            model: String::new(),
            device: String::new(),
            client: (),
            info: WorkerClient::new(channel.clone()),
        }))
    }

    #[tokio::test]
    async fn pick_prefers_the_least_loaded_and_releases_on_drop() {
        let pool = pool(&["a", "b"]);
        let first = pool.pick(100).expect("a worker");
        let second = pool.pick(1).expect("a worker");
        assert_ne!(first.worker().id, second.worker().id);
        let third = pool.pick(1).expect("a worker");
        assert_eq!(third.worker().id, second.worker().id, "101 > 1 load");
        assert_eq!(third.worker().requests_in_flight(), 2);
        drop(first);
        drop(third);
        let fourth = pool.pick(1).expect("a worker");
        assert_ne!(fourth.worker().id, second.worker().id);
    }

    #[tokio::test]
    async fn ties_rotate_cordoned_workers_are_skipped_and_none_is_left() {
        let pool = pool(&["a", "b"]);
        let a = pool.pick(0).expect("worker").worker().id.clone();
        let b = pool.pick(0).expect("worker").worker().id.clone();
        assert_ne!(a, b);
        pool.find("a").expect("a").set_state(AdminState::Cordoned);
        for _ in 0..4 {
            assert_eq!(pool.pick(0).expect("b").worker().id, "b");
        }
        pool.find("b").expect("b").set_state(AdminState::Draining);
        assert!(pool.pick(1).is_none());
    }
}
