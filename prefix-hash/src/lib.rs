//! Rolling hashes of token prefixes, one per full KV block: the engine keys its prefix cache
//! by them and the router its index of what each worker caches, so both must compute them
//! the same way (hence this crate, which both depend on and which depends on nothing).

/// FNV-1a: fixed, documented constants, so hashes agree across processes and versions.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Rolling hash of a full block of tokens and every token before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// Hashes of each full `block_size` block of `tokens`; block i's hash covers tokens
/// `0..(i + 1) · block_size`, so equal hashes mean equal prefixes.
pub fn prefix_block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = FNV_OFFSET;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|block| {
            let mut h = parent;
            for byte in block.iter().flat_map(|t| t.to_le_bytes()) {
                h ^= u64::from(byte);
                h = h.wrapping_mul(FNV_PRIME);
            }
            parent = h;
            BlockHash(h)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_hashes_equal_exactly_for_equal_prefixes() {
        let a = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        let b = [1, 2, 3, 4, 5, 6, 0, 8];
        let ha = prefix_block_hashes(&a, 2);
        let hb = prefix_block_hashes(&b, 2);
        assert_eq!(ha.len(), 4, "only full blocks are hashed");
        assert_eq!(hb.len(), 4);
        assert_eq!(ha[..3], hb[..3]);
        assert_ne!(ha[3], hb[3]);
    }

    #[test]
    fn prefix_hash_depends_on_earlier_blocks() {
        let a = prefix_block_hashes(&[1, 2, 3, 4], 2);
        let b = prefix_block_hashes(&[9, 9, 3, 4], 2);
        assert_ne!(a[1], b[1]);
    }
}
