//! What each prefill worker holds in its prefix cache, kept from the workers' KV events
//! (a snapshot, then numbered changes; a gap means a new snapshot), and how many of a
//! prompt's tokens a worker would not have to compute.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tandem_prefix_hash::{BlockHash, prefix_block_hashes};
use tandem_proto::internal::v1::{KvEventBatch, WatchKvEventsRequest};

use crate::orchestrate::Cluster;

/// Pause before watching a worker again after its stream broke.
const REWATCH_AFTER: Duration = Duration::from_millis(500);
/// How often an idle watch checks that its worker is still in the prefill pool.
const MEMBERSHIP_CHECK: Duration = Duration::from_secs(2);

/// How long a prefix this router sent to a worker counts as cached there before the worker
/// reports it stored: long enough for a prefill, short enough that a failed one is forgotten.
const ROUTED_COUNTS_FOR: Duration = Duration::from_secs(10);

/// One worker's cached prefix hashes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Cached {
    block_size: usize,
    hashes: HashSet<u64>,
    last_id: u64,
    /// Prefixes this router sent there that the worker has not reported stored yet, and when:
    /// a burst of prompts with one prefix then goes to one worker, not to every idle one.
    routed: HashMap<u64, Instant>,
}

/// A prompt's prefix hashes, computed once per block size however many workers are scored.
pub(crate) struct PromptHashes<'a> {
    prompt: &'a [u32],
    by_block_size: RefCell<Vec<(usize, Rc<[u64]>)>>,
}

impl<'a> PromptHashes<'a> {
    pub(crate) fn new(prompt: &'a [u32]) -> Self {
        Self {
            prompt,
            by_block_size: RefCell::new(Vec::new()),
        }
    }

    pub(crate) fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    fn of_blocks(&self, block_size: usize) -> Rc<[u64]> {
        let mut known = self.by_block_size.borrow_mut();
        if let Some((_, hashes)) = known.iter().find(|(size, _)| *size == block_size) {
            return Rc::clone(hashes);
        }
        let hashes: Rc<[u64]> = prefix_block_hashes(self.prompt, block_size)
            .into_iter()
            .map(|BlockHash(h)| h)
            .collect();
        known.push((block_size, Rc::clone(&hashes)));
        hashes
    }
}

/// A change that does not follow the last one seen: the watcher must start over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    pub expected: u64,
    pub got: u64,
}

#[derive(Debug, Default)]
pub(crate) struct PrefixIndex {
    workers: RwLock<HashMap<String, Cached>>,
    /// Workers with a watch running, so a worker that rejoins gets one, not two.
    watched: Mutex<HashSet<String>>,
}

impl PrefixIndex {
    /// Applies one batch of `worker`'s events; a snapshot replaces what was known.
    pub(crate) fn apply(&self, worker: &str, batch: &KvEventBatch) -> Result<(), Gap> {
        let mut workers = self.workers.write().unwrap_or_else(PoisonError::into_inner);
        if batch.snapshot {
            let cached = workers.entry(worker.to_owned()).or_default();
            cached.block_size = batch.block_size.max(1) as usize;
            cached.hashes = batch.stored.iter().copied().collect();
            cached.last_id = batch.id;
            for h in &batch.stored {
                cached.routed.remove(h);
            }
            return Ok(());
        }
        let cached = workers.entry(worker.to_owned()).or_default();
        if batch.id != cached.last_id + 1 || cached.block_size == 0 {
            return Err(Gap {
                expected: cached.last_id + 1,
                got: batch.id,
            });
        }
        cached.last_id = batch.id;
        for h in &batch.evicted {
            cached.hashes.remove(h);
        }
        for h in &batch.stored {
            cached.routed.remove(h);
        }
        cached.hashes.extend(&batch.stored);
        Ok(())
    }

    /// Records that `prompt` was sent to `worker` to prefill: its blocks count as cached
    /// there until the worker reports them, or for [`ROUTED_COUNTS_FOR`].
    pub(crate) fn note_routed(&self, worker: &str, prompt: &PromptHashes<'_>) {
        let mut workers = self.workers.write().unwrap_or_else(PoisonError::into_inner);
        let Some(cached) = workers.get_mut(worker).filter(|c| c.block_size > 0) else {
            return;
        };
        let now = Instant::now();
        cached
            .routed
            .retain(|_, since| now.duration_since(*since) < ROUTED_COUNTS_FOR);
        for &h in prompt.of_blocks(cached.block_size).iter() {
            if !cached.hashes.contains(&h) {
                cached.routed.insert(h, now);
            }
        }
    }

    pub(crate) fn forget(&self, worker: &str) {
        self.workers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(worker);
    }

    /// Leading tokens of `prompt` in `worker`'s cache (whole blocks).
    pub(crate) fn cached_tokens(&self, worker: &str, prompt: &PromptHashes<'_>) -> usize {
        let workers = self.workers.read().unwrap_or_else(PoisonError::into_inner);
        let Some(cached) = workers.get(worker) else {
            return 0;
        };
        let now = Instant::now();
        let blocks = prompt
            .of_blocks(cached.block_size)
            .iter()
            .take_while(|h| {
                cached.hashes.contains(h)
                    || cached
                        .routed
                        .get(h)
                        .is_some_and(|since| now.duration_since(*since) < ROUTED_COUNTS_FOR)
            })
            .count();
        blocks * cached.block_size
    }

    /// Starts following the prefill worker `id`'s KV events, unless that already runs. The
    /// watch ends when the worker leaves the prefill pool.
    pub(crate) fn watch(cluster: &Arc<Cluster>, id: &str) {
        let index = &cluster.prefix_index;
        if !index
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned())
        {
            return;
        }
        let (cluster, id) = (Arc::clone(cluster), id.to_owned());
        tokio::spawn(async move {
            watch_worker(&cluster, &id).await;
            cluster.prefix_index.forget(&id);
            cluster
                .prefix_index
                .watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }
}

/// Follows one worker's event stream, starting over (a new snapshot) after a gap or a
/// broken stream, until the worker leaves the prefill pool.
async fn watch_worker(cluster: &Cluster, id: &str) {
    loop {
        let Some(worker) = cluster.prefill.find(id) else {
            return;
        };
        let mut client = worker.info.clone();
        drop(worker);
        if let Ok(response) = client.watch_kv_events(WatchKvEventsRequest {}).await {
            let mut stream = response.into_inner();
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    () = tokio::time::sleep(MEMBERSHIP_CHECK) => {
                        if cluster.prefill.find(id).is_none() {
                            return;
                        }
                        continue;
                    }
                };
                let Ok(Some(batch)) = message else { break };
                if let Err(gap) = cluster.prefix_index.apply(id, &batch) {
                    tracing::debug!(worker = id, ?gap, "kv events skipped some; resyncing");
                    break;
                }
            }
        }
        tokio::time::sleep(REWATCH_AFTER).await;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn change(id: u64, stored: &[u64], evicted: &[u64]) -> KvEventBatch {
        KvEventBatch {
            id,
            stored: stored.to_vec(),
            evicted: evicted.to_vec(),
            ..KvEventBatch::default()
        }
    }

    #[test]
    fn cached_tokens_count_whole_leading_blocks() {
        let index = PrefixIndex::default();
        let prompt: Vec<u32> = (0..40).collect();
        let hashes: Vec<u64> = prefix_block_hashes(&prompt, 16)
            .iter()
            .map(|h| h.0)
            .collect();
        let snapshot = KvEventBatch {
            id: 7,
            snapshot: true,
            stored: vec![hashes[0]],
            block_size: 16,
            ..KvEventBatch::default()
        };
        index.apply("a", &snapshot).expect("snapshot");
        assert_eq!(index.cached_tokens("a", &PromptHashes::new(&prompt)), 16);
        index
            .apply("a", &change(8, &[hashes[1]], &[]))
            .expect("next");
        assert_eq!(index.cached_tokens("a", &PromptHashes::new(&prompt)), 32);
        index
            .apply("a", &change(9, &[], &[hashes[0]]))
            .expect("next");
        assert_eq!(
            index.cached_tokens("a", &PromptHashes::new(&prompt)),
            0,
            "only a leading run counts"
        );
        assert_eq!(
            index.cached_tokens("b", &PromptHashes::new(&prompt)),
            0,
            "unknown workers hold nothing"
        );
        index.note_routed("a", &PromptHashes::new(&prompt));
        assert_eq!(
            index.cached_tokens("a", &PromptHashes::new(&prompt)),
            32,
            "a prompt sent there counts before the worker reports it"
        );
    }

    #[test]
    fn a_gap_is_refused_until_a_new_snapshot() {
        let index = PrefixIndex::default();
        let snapshot = |id| KvEventBatch {
            id,
            snapshot: true,
            block_size: 4,
            ..KvEventBatch::default()
        };
        index.apply("a", &snapshot(3)).expect("snapshot");
        assert_eq!(
            index.apply("a", &change(5, &[1], &[])),
            Err(Gap {
                expected: 4,
                got: 5
            })
        );
        index.apply("a", &snapshot(5)).expect("a new snapshot");
        index
            .apply("a", &change(6, &[1], &[]))
            .expect("in order again");
        assert_eq!(
            index.apply("b", &change(1, &[1], &[])),
            Err(Gap {
                expected: 1,
                got: 1
            }),
            "changes before any snapshot are refused"
        );
    }

    proptest! {
        /// Random store/evict changes applied in order equal a naive set; after any
        /// snapshot the index equals that snapshot.
        #[test]
        fn index_matches_a_naive_set(changes in proptest::collection::vec(
            (proptest::collection::vec(0u64..20, 0..4), proptest::collection::vec(0u64..20, 0..4)),
            1..60,
        )) {
            let index = PrefixIndex::default();
            index.apply("w", &KvEventBatch { id: 0, snapshot: true, block_size: 1, ..KvEventBatch::default() }).expect("snapshot");
            let mut naive: HashSet<u64> = HashSet::new();
            for (i, (stored, evicted)) in changes.iter().enumerate() {
                index.apply("w", &change(i as u64 + 1, stored, evicted)).expect("in order");
                for h in evicted {
                    naive.remove(h);
                }
                naive.extend(stored);
                let held = index.workers.read().expect("lock")["w"].hashes.clone();
                prop_assert_eq!(&held, &naive);
            }
        }
    }
}
