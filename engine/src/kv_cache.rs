//! Paged KV storage for every layer, the block allocator, and the prefix cache: the full
//! blocks of computed prompts stay cached under their rolling prefix hash after their
//! sequence ends, until their room is needed, so a later prompt with the same prefix skips
//! computing it.

use std::collections::{BTreeMap, HashMap};

pub use tandem_prefix_hash::{BlockHash, prefix_block_hashes};

use crate::backend::{Backend, KvSpec};
use crate::block_pool::{BlockId, BlockPool};
use crate::error::Result;

/// A change to the set of cached prefix blocks, for routers that send each prompt where its
/// prefix already is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    Stored(Vec<BlockHash>),
    Evicted(Vec<BlockHash>),
}

/// Cached prompt blocks by prefix hash, and the ones no sequence holds, oldest first.
#[derive(Debug, Default)]
struct PrefixCache {
    by_hash: HashMap<BlockHash, BlockId>,
    hash_of: HashMap<BlockId, BlockHash>,
    /// Cached blocks without users, by release time (evicted oldest first).
    idle: BTreeMap<u64, BlockId>,
    idle_since: HashMap<BlockId, u64>,
    clock: u64,
    events: Vec<KvEvent>,
}

/// One store per layer, all indexed by the same block ids.
pub(crate) struct KvCache<B: Backend> {
    pub(crate) layers: Vec<B::KvStore>,
    pool: BlockPool,
    pub(crate) block_size: usize,
    /// None with prefix caching off.
    prefix: Option<PrefixCache>,
}

impl<B: Backend> KvCache<B> {
    pub(crate) fn new(
        backend: &B,
        num_layers: usize,
        spec: KvSpec,
        prefix_caching: bool,
    ) -> Result<Self> {
        Ok(Self {
            layers: (0..num_layers)
                .map(|_| backend.kv_store(&spec))
                .collect::<Result<_>>()?,
            pool: BlockPool::new(spec.num_blocks as u32),
            block_size: spec.block_size,
            prefix: prefix_caching.then(PrefixCache::default),
        })
    }

    /// Blocks needed to hold `tokens` tokens.
    pub(crate) fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Cache slot of `position` in a sequence with `table`.
    pub(crate) fn slot(&self, table: &[BlockId], position: usize) -> usize {
        table[position / self.block_size].0 as usize * self.block_size + position % self.block_size
    }

    pub(crate) fn total(&self) -> usize {
        self.pool.total()
    }

    /// Blocks a new sequence can get: free ones and cached ones nobody holds.
    pub(crate) fn free_count(&self) -> usize {
        self.pool.free_count() + self.prefix.as_ref().map_or(0, |p| p.idle.len())
    }

    pub(crate) fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Takes `n` blocks, all or none, evicting the cached blocks idle longest if the free
    /// ones do not suffice.
    pub(crate) fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free_count() {
            return None;
        }
        if let Some(prefix) = &mut self.prefix {
            let mut evicted = Vec::new();
            while self.pool.free_count() < n {
                let Some((_, block)) = prefix.idle.pop_first() else {
                    break;
                };
                prefix.idle_since.remove(&block);
                if let Some(hash) = prefix.hash_of.remove(&block) {
                    prefix.by_hash.remove(&hash);
                    evicted.push(hash);
                }
                self.pool.reclaim(block);
            }
            if !evicted.is_empty() {
                prefix.events.push(KvEvent::Evicted(evicted));
            }
        }
        self.pool.allocate(n)
    }

    /// Drops a sequence's hold on `blocks`; cached ones stay cached, the rest become free.
    pub(crate) fn release(&mut self, blocks: &[BlockId]) {
        match &mut self.prefix {
            None => {
                self.pool.release(blocks);
            }
            Some(prefix) => {
                let mut set_aside = Vec::new();
                self.pool.release_keeping(blocks, |b| {
                    let cached = prefix.hash_of.contains_key(&b);
                    if cached {
                        set_aside.push(b);
                    }
                    cached
                });
                for block in set_aside {
                    prefix.clock += 1;
                    prefix.idle.insert(prefix.clock, block);
                    prefix.idle_since.insert(block, prefix.clock);
                }
            }
        }
    }

    /// The cached blocks holding the longest run of `hashes` from the start, each taken for
    /// one more user.
    pub(crate) fn take_cached_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let Some(prefix) = &mut self.prefix else {
            return Vec::new();
        };
        let blocks: Vec<BlockId> = hashes
            .iter()
            .map_while(|h| prefix.by_hash.get(h).copied())
            .collect();
        for &block in &blocks {
            match prefix.idle_since.remove(&block) {
                Some(since) => {
                    prefix.idle.remove(&since);
                    self.pool.revive(block);
                }
                None => {
                    self.pool.fork(&[block]);
                }
            }
        }
        blocks
    }

    /// Records that `block` holds the computed prefix `hash` (unless that prefix is cached
    /// already, or the block caches another).
    pub(crate) fn cache(&mut self, hash: BlockHash, block: BlockId) {
        let Some(prefix) = &mut self.prefix else {
            return;
        };
        if prefix.by_hash.contains_key(&hash) || prefix.hash_of.contains_key(&block) {
            return;
        }
        prefix.by_hash.insert(hash, block);
        prefix.hash_of.insert(block, hash);
        match prefix.events.last_mut() {
            Some(KvEvent::Stored(hashes)) => hashes.push(hash),
            _ => prefix.events.push(KvEvent::Stored(vec![hash])),
        }
    }

    /// Changes to the cached set since the last call, in order.
    pub(crate) fn take_events(&mut self) -> Vec<KvEvent> {
        self.prefix
            .as_mut()
            .map(|p| std::mem::take(&mut p.events))
            .unwrap_or_default()
    }

    /// Every cached prefix hash now.
    pub(crate) fn cached_hashes(&self) -> Vec<BlockHash> {
        self.prefix
            .as_ref()
            .map(|p| p.by_hash.keys().copied().collect())
            .unwrap_or_default()
    }
}
