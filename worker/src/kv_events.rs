//! The worker's prefix-cache events for routers: every change its engine makes gets the next
//! id; the hub keeps the cached set, so a new watcher starts from a snapshot consistent with
//! the ids that follow.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use tandem_engine::KvEvent;
use tandem_proto::internal::v1::KvEventBatch;
use tokio::sync::broadcast;

/// Changes buffered per watcher; one that falls further behind gets a fresh snapshot.
const WATCHER_BUFFER: usize = 4096;

pub(crate) struct KvEventHub {
    state: Mutex<HubState>,
    block_size: u32,
}

struct HubState {
    last_id: u64,
    cached: HashSet<u64>,
    sender: broadcast::Sender<KvEventBatch>,
}

impl KvEventHub {
    pub(crate) fn new(block_size: u32) -> Self {
        Self {
            block_size,
            state: Mutex::new(HubState {
                last_id: 0,
                cached: HashSet::new(),
                sender: broadcast::channel(WATCHER_BUFFER).0,
            }),
        }
    }

    /// Numbers and sends `events` (an engine thread calls this after each step).
    pub(crate) fn publish(&self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for event in events {
            state.last_id += 1;
            let mut batch = KvEventBatch {
                id: state.last_id,
                ..KvEventBatch::default()
            };
            match event {
                KvEvent::Stored(hashes) => {
                    batch.stored = hashes.iter().map(|h| h.0).collect();
                    state.cached.extend(&batch.stored);
                }
                KvEvent::Evicted(hashes) => {
                    batch.evicted = hashes.iter().map(|h| h.0).collect();
                    for h in &batch.evicted {
                        state.cached.remove(h);
                    }
                }
            }
            // No watcher is fine: the snapshot covers it.
            let _ = state.sender.send(batch);
        }
    }

    /// A snapshot of the cached set and the changes after it.
    pub(crate) fn subscribe(&self) -> (KvEventBatch, broadcast::Receiver<KvEventBatch>) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = KvEventBatch {
            id: state.last_id,
            snapshot: true,
            stored: state.cached.iter().copied().collect(),
            evicted: Vec::new(),
            block_size: self.block_size,
        };
        (snapshot, state.sender.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use tandem_engine::BlockHash;

    use super::*;

    #[test]
    fn a_snapshot_and_the_changes_after_it_rebuild_the_set() {
        let hub = KvEventHub::new(16);
        hub.publish(vec![KvEvent::Stored(vec![BlockHash(1), BlockHash(2)])]);
        let (snapshot, mut changes) = hub.subscribe();
        assert_eq!(snapshot.id, 1);
        hub.publish(vec![
            KvEvent::Evicted(vec![BlockHash(1)]),
            KvEvent::Stored(vec![BlockHash(3)]),
        ]);
        let mut set: HashSet<u64> = snapshot.stored.into_iter().collect();
        for expected_id in [2, 3] {
            let batch = changes.try_recv().expect("a change");
            assert_eq!(batch.id, expected_id);
            for h in batch.evicted {
                set.remove(&h);
            }
            set.extend(batch.stored);
        }
        assert_eq!(set, HashSet::from([2, 3]));
    }
}
