//! Admission: a bounded number of requests run, a bounded number wait, the rest are refused
//! at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RouterError;

#[derive(Debug)]
pub(crate) struct Admission {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_concurrent: usize,
    queue_depth: usize,
}

/// Gives a waiting slot back when the wait ends, however it ends.
struct WaitingSlot<'a>(&'a AtomicUsize);

impl Drop for WaitingSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub(crate) fn new(max_concurrent: usize, queue_depth: usize) -> Self {
        Self {
            running: Arc::new(Semaphore::new(max_concurrent)),
            waiting: AtomicUsize::new(0),
            max_concurrent,
            queue_depth,
        }
    }

    /// Requests holding a slot and requests waiting for one.
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        let running = self.max_concurrent - self.running.available_permits();
        (running, self.waiting.load(Ordering::Relaxed))
    }

    /// A running slot, held for the request's whole stream. Waits in the queue (at most
    /// `timeout`) when every slot is taken; refuses at once when the queue is full too.
    pub(crate) async fn admit(
        &self,
        timeout: Duration,
    ) -> Result<OwnedSemaphorePermit, RouterError> {
        if let Ok(permit) = Arc::clone(&self.running).try_acquire_owned() {
            return Ok(permit);
        }
        let full = RouterError::QueueFull {
            concurrent: self.max_concurrent,
            waiting: self.queue_depth,
        };
        self.waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                (w < self.queue_depth).then_some(w + 1)
            })
            .map_err(|_| full)?;
        let _slot = WaitingSlot(&self.waiting);
        match tokio::time::timeout(timeout, Arc::clone(&self.running).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(RouterError::Internal("admission closed".into())),
            Err(_elapsed) => Err(RouterError::Timeout {
                seconds: timeout.as_secs_f64(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn full_queue_refuses_at_once_and_a_waiter_times_out() {
        let admission = Admission::new(1, 1);
        let running = admission.admit(Duration::from_secs(1)).await.expect("slot");
        let waiter = admission.admit(Duration::from_secs(5));
        tokio::pin!(waiter);
        // Let the waiter take the queue slot.
        assert!(
            tokio::time::timeout(Duration::from_millis(1), &mut waiter)
                .await
                .is_err()
        );
        let refused = admission.admit(Duration::from_secs(1)).await.unwrap_err();
        assert!(
            matches!(refused, RouterError::QueueFull { .. }),
            "{refused}"
        );
        assert!(matches!(
            waiter.await.unwrap_err(),
            RouterError::Timeout { .. }
        ));
        drop(running);
        assert!(admission.admit(Duration::from_secs(1)).await.is_ok());
    }
}
