//! Worker pools, each worker's admin state, and the load-aware choice between the workers that
//! take new requests.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tandem_common::registry::WorkerRecord;
use tandem_common::tls::Tls;
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
    /// Data-parallel ranks sharing that load.
    ranks: usize,
    /// Requests in flight from this router.
    requests: AtomicUsize,
    /// The last `tokens_total` seen and when, for a tokens/s figure.
    pub(crate) last_sample: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// After a failed call: no new requests until then, so a crashed worker costs at most one
    /// retry before the registry drops it.
    held_back_until: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Workers of one role; membership follows the registry.
#[derive(Debug)]
pub(crate) struct Pool<C> {
    workers: RwLock<Vec<Arc<Worker<C>>>>,
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

    /// Load in flight from this router, in the pool's unit.
    pub(crate) fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    pub(crate) fn requests_in_flight(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Takes the worker out of the choice for `period`.
    pub(crate) fn hold_back(&self, period: std::time::Duration) {
        *self
            .held_back_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(std::time::Instant::now() + period);
    }

    fn is_held_back(&self) -> bool {
        self.held_back_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| std::time::Instant::now() < until)
    }
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Self {
            workers: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
        }
    }
}

impl<C> Pool<C> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Worker<C>>>> {
        self.workers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the pool hold exactly `records`: workers already known (same id and address)
    /// keep their state and load; new ones get a client from `client`. Returns the ids added
    /// and removed.
    pub(crate) fn sync(
        &self,
        records: &[&WorkerRecord],
        tls: Option<&Tls>,
        client: impl Fn(Channel) -> C,
    ) -> (Vec<String>, Vec<String>) {
        let mut workers = self
            .workers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let removed: Vec<String> = workers
            .iter()
            .filter(|w| !records.iter().any(|r| r.id == w.id && r.grpc == w.addr))
            .map(|w| w.id.clone())
            .collect();
        workers.retain(|w| !removed.contains(&w.id));
        let mut added = Vec::new();
        for record in records {
            if workers.iter().any(|w| w.id == record.id) {
                continue;
            }
            let Ok(channel) = tandem_common::tls::grpc_channel(&record.grpc, tls) else {
                tracing::warn!(id = %record.id, grpc = %record.grpc, "worker address is not host:port");
                continue;
            };
            workers.push(Arc::new(Worker {
                id: record.id.clone(),
                addr: record.grpc.clone(),
                model: record.model.clone(),
                device: record.device.clone(),
                client: client(channel.clone()),
                info: WorkerClient::new(channel),
                state: AtomicU8::new(AdminState::Ready as u8),
                load: AtomicUsize::new(0),
                ranks: record.ranks.max(1) as usize,
                requests: AtomicUsize::new(0),
                last_sample: std::sync::Mutex::new(None),
                held_back_until: std::sync::Mutex::new(None),
            }));
            added.push(record.id.clone());
        }
        (added, removed)
    }

    /// The workers now.
    pub(crate) fn workers(&self) -> Vec<Arc<Worker<C>>> {
        self.read().clone()
    }

    pub(crate) fn find(&self, id: &str) -> Option<Arc<Worker<C>>> {
        self.read().iter().find(|w| w.id == id).cloned()
    }

    /// The ready worker with the least load per data-parallel rank, ties going round-robin,
    /// charged `cost` until the lease drops. None when no worker takes new requests.
    pub(crate) fn pick(&self, cost: usize) -> Option<Lease<C>> {
        self.pick_by(|_| cost)
    }

    /// The ready worker whose load plus `cost(worker)` (the work this request would add
    /// there), per data-parallel rank, is least; ties go round-robin. It is charged its cost
    /// until the lease drops.
    pub(crate) fn pick_by(&self, cost: impl Fn(&Worker<C>) -> usize) -> Option<Lease<C>> {
        let workers = self.read();
        let n = workers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let (worker, cost) = (0..n)
            .map(|i| &workers[(start + i) % n])
            .filter(|w| w.state() == AdminState::Ready && !w.is_held_back())
            .map(|w| (w, cost(w)))
            .min_by(|(a, a_cost), (b, b_cost)| {
                // (a.load + a_cost) / a.ranks against the same of b, without division.
                let a_share = (a.load.load(Ordering::Relaxed) + a_cost) * b.ranks;
                let b_share = (b.load.load(Ordering::Relaxed) + b_cost) * a.ranks;
                a_share.cmp(&b_share)
            })?;
        Some(Self::lease(worker, cost))
    }

    /// The next ready worker in turn, whatever its load, charged `cost`.
    pub(crate) fn pick_in_turn(&self, cost: usize) -> Option<Lease<C>> {
        let workers = self.read();
        let n = workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let worker = (0..n)
            .map(|i| &workers[(start + i) % n])
            .find(|w| w.state() == AdminState::Ready && !w.is_held_back())?;
        Some(Self::lease(worker, cost))
    }

    fn lease(worker: &Arc<Worker<C>>, cost: usize) -> Lease<C> {
        worker.load.fetch_add(cost, Ordering::Relaxed);
        worker.requests.fetch_add(1, Ordering::Relaxed);
        Lease {
            worker: Arc::clone(worker),
            cost,
        }
    }
}

impl<C> Lease<C> {
    pub(crate) fn worker(&self) -> &Worker<C> {
        &self.worker
    }

    pub(crate) fn shared(&self) -> Arc<Worker<C>> {
        Arc::clone(&self.worker)
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

    fn record(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.to_owned(),
            role: tandem_common::registry::WorkerRole::Decode,
            grpc: "127.0.0.1:1".to_owned(),
            model: "m".to_owned(),
            device: "cpu".to_owned(),
            ranks: 1,
        }
    }

    fn pool(ids: &[&str]) -> Pool<()> {
        let pool = Pool::default();
        let records: Vec<WorkerRecord> = ids.iter().map(|id| record(id)).collect();
        pool.sync(&records.iter().collect::<Vec<_>>(), None, |_| ());
        pool
    }

    #[tokio::test]
    async fn sync_keeps_known_workers_with_their_state_and_drops_vanished_ones() {
        let pool = pool(&["a", "b"]);
        pool.find("a").expect("a").set_state(AdminState::Cordoned);
        let (a, c) = (record("a"), record("c"));
        let (added, removed) = pool.sync(&[&a, &c], None, |_| ());
        assert_eq!(
            (added, removed),
            (vec!["c".to_owned()], vec!["b".to_owned()])
        );
        assert_eq!(pool.find("a").expect("a").state(), AdminState::Cordoned);
        assert!(pool.find("b").is_none());
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
    async fn load_is_spread_in_proportion_to_data_parallel_ranks() {
        let pool = Pool::default();
        let wide = WorkerRecord {
            ranks: 4,
            ..record("wide")
        };
        pool.sync(&[&wide, &record("narrow")], None, |_| ());
        let leases: Vec<_> = (0..10).map(|_| pool.pick(1).expect("a worker")).collect();
        let on_wide = leases.iter().filter(|l| l.worker().id == "wide").count();
        assert_eq!(
            on_wide, 8,
            "4 ranks take 4 requests for every 1 of a single rank"
        );
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
        pool.find("b").expect("b").set_state(AdminState::Ready);
        pool.find("b")
            .expect("b")
            .hold_back(std::time::Duration::from_secs(60));
        assert!(pool.pick(1).is_none(), "a held-back worker is skipped");
    }
}
