//! Worker pools and the load-aware choice between their members.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One worker as this router sees it: its client and the load this router has put on it.
#[derive(Debug)]
pub(crate) struct Worker<C> {
    pub addr: String,
    pub client: C,
    /// Load in flight from this router, in the pool's unit (prompt tokens for prefill,
    /// sequences for decode).
    load: AtomicUsize,
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

impl<C> Pool<C> {
    pub(crate) fn new(workers: impl IntoIterator<Item = (String, C)>) -> Self {
        Self {
            workers: workers
                .into_iter()
                .map(|(addr, client)| {
                    Arc::new(Worker {
                        addr,
                        client,
                        load: AtomicUsize::new(0),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub(crate) fn workers(&self) -> impl Iterator<Item = &Worker<C>> {
        self.workers.iter().map(|w| w.as_ref())
    }

    /// The worker with the least load, ties going round-robin, charged `cost` until the lease
    /// drops.
    pub(crate) fn pick(&self, cost: usize) -> Option<Lease<C>> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let worker = (0..n)
            .map(|i| &self.workers[(start + i) % n])
            .min_by_key(|w| w.load.load(Ordering::Relaxed))?;
        worker.load.fetch_add(cost, Ordering::Relaxed);
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_prefers_the_least_loaded_and_releases_on_drop() {
        let pool = Pool::new([("a".to_owned(), ()), ("b".to_owned(), ())]);
        let first = pool.pick(100).expect("a worker");
        let second = pool.pick(1).expect("a worker");
        assert_ne!(first.worker().addr, second.worker().addr);
        let third = pool.pick(1).expect("a worker");
        assert_eq!(third.worker().addr, second.worker().addr, "101 > 1 load");
        drop(first);
        drop(third);
        let fourth = pool.pick(1).expect("a worker");
        assert_ne!(fourth.worker().addr, second.worker().addr);
    }

    #[test]
    fn ties_rotate_and_an_empty_pool_picks_nothing() {
        let pool = Pool::new([("a".to_owned(), ()), ("b".to_owned(), ())]);
        let a = pool.pick(0).expect("worker").worker().addr.clone();
        let b = pool.pick(0).expect("worker").worker().addr.clone();
        assert_ne!(a, b);
        assert!(Pool::<()>::new([]).pick(1).is_none());
    }
}
