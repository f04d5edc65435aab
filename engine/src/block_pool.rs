//! Logical KV block allocator with reference counts, so equal prefixes can share blocks.

/// Index of a KV block, the same in every layer's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Hands out blocks and counts their users. A block is free when its count is zero.
#[derive(Debug, Clone)]
pub struct BlockPool {
    refcounts: Vec<u32>,
    free: Vec<BlockId>,
}

impl BlockPool {
    /// A pool of `total` free blocks.
    pub fn new(total: u32) -> Self {
        Self {
            refcounts: vec![0; total as usize],
            // Reversed so blocks are handed out lowest id first.
            free: (0..total).rev().map(BlockId).collect(),
        }
    }

    pub fn total(&self) -> usize {
        self.refcounts.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let blocks = self.free.split_off(self.free.len() - n);
        for b in &blocks {
            self.refcounts[b.0 as usize] = 1;
        }
        Some(blocks)
    }

    /// Adds one user to each of `blocks` (a forked or prefix-sharing sequence). Returns false,
    /// changing nothing, if any block is free or unknown.
    pub fn fork(&mut self, blocks: &[BlockId]) -> bool {
        if !blocks.iter().all(|b| self.count(*b).is_some_and(|c| c > 0)) {
            return false;
        }
        for b in blocks {
            self.refcounts[b.0 as usize] += 1;
        }
        true
    }

    /// Drops one user from each of `blocks`; a block whose last user leaves becomes free.
    /// Returns false, changing nothing, if any block is already free or unknown.
    pub fn release(&mut self, blocks: &[BlockId]) -> bool {
        self.release_keeping(blocks, |_| false)
    }

    /// [`BlockPool::release`], except that a block whose last user leaves and for which
    /// `keep` says so is set aside instead of freed (its contents stay valid): the prefix
    /// cache then [`revive`](BlockPool::revive)s or [`reclaim`](BlockPool::reclaim)s it.
    pub fn release_keeping(
        &mut self,
        blocks: &[BlockId],
        mut keep: impl FnMut(BlockId) -> bool,
    ) -> bool {
        let mut drops: Vec<BlockId> = blocks.to_vec();
        drops.sort_unstable();
        let valid = drops
            .chunk_by(|a, b| a == b)
            .all(|run| self.count(run[0]).is_some_and(|c| c as usize >= run.len()));
        if !valid {
            return false;
        }
        for b in blocks {
            let count = &mut self.refcounts[b.0 as usize];
            *count -= 1;
            if *count == 0 && !keep(*b) {
                self.free.push(*b);
            }
        }
        true
    }

    /// Gives a set-aside block (no users, not free) its first user again.
    pub fn revive(&mut self, block: BlockId) {
        if let Some(count @ 0) = self.refcounts.get_mut(block.0 as usize) {
            *count = 1;
        }
    }

    /// Frees a block set aside by [`BlockPool::release_keeping`] (and only such a block).
    pub fn reclaim(&mut self, block: BlockId) {
        debug_assert!(
            !self.free.contains(&block),
            "block {} is already free",
            block.0
        );
        if self.count(block) == Some(0) {
            self.free.push(block);
        }
    }

    /// Users of `block`, or `None` for an id outside the pool.
    pub fn count(&self, block: BlockId) -> Option<u32> {
        self.refcounts.get(block.0 as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(usize),
        Fork(usize),
        Release(usize),
        ReleaseUnknown(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..6).prop_map(Op::Allocate),
            any::<usize>().prop_map(Op::Fork),
            any::<usize>().prop_map(Op::Release),
            (0u32..40).prop_map(Op::ReleaseUnknown),
        ]
    }

    proptest! {
        /// Random alloc/fork/release sequences against a naive reference count model: no block
        /// is handed out twice, none leaks, counts agree.
        #[test]
        fn pool_matches_naive_model(ops in proptest::collection::vec(op(), 1..200)) {
            const TOTAL: u32 = 16;
            let mut pool = BlockPool::new(TOTAL);
            let mut model: HashMap<u32, u32> = HashMap::new();
            // Each holder is one user's list of blocks, as a sequence would hold them.
            let mut holders: Vec<Vec<BlockId>> = Vec::new();
            for op in ops {
                match op {
                    Op::Allocate(n) => {
                        let free = TOTAL as usize - model.len();
                        match pool.allocate(n) {
                            Some(blocks) => {
                                prop_assert!(n <= free);
                                prop_assert_eq!(blocks.len(), n);
                                for b in &blocks {
                                    prop_assert!(!model.contains_key(&b.0), "block {} handed out twice", b.0);
                                    model.insert(b.0, 1);
                                }
                                holders.push(blocks);
                            }
                            None => prop_assert!(n > free),
                        }
                    }
                    Op::Fork(i) if !holders.is_empty() => {
                        let blocks = holders[i % holders.len()].clone();
                        prop_assert!(pool.fork(&blocks));
                        for b in &blocks {
                            *model.entry(b.0).or_default() += 1;
                        }
                        holders.push(blocks);
                    }
                    Op::Release(i) if !holders.is_empty() => {
                        let blocks = holders.swap_remove(i % holders.len());
                        prop_assert!(pool.release(&blocks));
                        for b in &blocks {
                            let c = model.get_mut(&b.0).expect("held block is in the model");
                            *c -= 1;
                            if *c == 0 {
                                model.remove(&b.0);
                            }
                        }
                    }
                    Op::ReleaseUnknown(id) => {
                        let held = model.contains_key(&id);
                        if !held {
                            prop_assert!(!pool.release(&[BlockId(id)]));
                        }
                    }
                    Op::Fork(_) | Op::Release(_) => {}
                }
                prop_assert_eq!(pool.used_count(), model.len());
                prop_assert_eq!(pool.free_count() + pool.used_count(), TOTAL as usize);
                for (id, c) in &model {
                    prop_assert_eq!(pool.count(BlockId(*id)), Some(*c));
                }
            }
            for blocks in holders.drain(..) {
                prop_assert!(pool.release(&blocks));
            }
            prop_assert_eq!(pool.free_count(), TOTAL as usize, "blocks leaked");
        }
    }

    #[test]
    fn release_of_free_block_changes_nothing() {
        let mut pool = BlockPool::new(4);
        let blocks = pool.allocate(2).expect("two of four blocks");
        assert!(pool.release(&blocks));
        assert!(!pool.release(&blocks[..1]));
        assert_eq!(pool.free_count(), 4);
    }

    #[test]
    fn release_listing_a_block_twice_needs_two_users() {
        let mut pool = BlockPool::new(2);
        let blocks = pool.allocate(1).expect("one block");
        assert!(!pool.release(&[blocks[0], blocks[0]]));
        assert_eq!(pool.count(blocks[0]), Some(1));
    }
}
