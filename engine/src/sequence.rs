//! One request's state inside the engine.

use crate::block_pool::BlockId;
use crate::sampling::Sampler;
use crate::tokenizer::IncrementalText;

/// The caller's id for a sequence, unique among the sequences in one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// When a sequence ends, besides the model's end-of-sequence tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCriteria {
    pub max_new_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    /// Matched on the decoded text; the text ends just before the match.
    pub stop_strings: Vec<String>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl StopCriteria {
    pub fn max_new_tokens(n: usize) -> Self {
        Self {
            max_new_tokens: n,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

pub(crate) struct Sequence {
    pub(crate) id: SeqId,
    pub(crate) prompt: Vec<u32>,
    pub(crate) output: Vec<u32>,
    pub(crate) blocks: Vec<BlockId>,
    /// Tokens whose K and V are in the cache.
    pub(crate) computed: usize,
    pub(crate) sampler: Sampler,
    pub(crate) stop: StopCriteria,
    pub(crate) text: Option<IncrementalText>,
    /// Its prompt KV is handed out layer by layer for another worker.
    pub(crate) export_kv: bool,
    /// Prefix hash of each full prompt block (empty until admitted).
    pub(crate) block_hashes: Vec<crate::kv_cache::BlockHash>,
    /// Leading prompt blocks already in the prefix cache (shared, or cached as computed).
    pub(crate) cached_blocks: usize,
}

impl Sequence {
    /// Prompt and output tokens so far.
    pub(crate) fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    pub(crate) fn token_at(&self, position: usize) -> u32 {
        match position.checked_sub(self.prompt.len()) {
            Some(i) => self.output[i],
            None => self.prompt[position],
        }
    }

    pub(crate) fn is_prefilling(&self) -> bool {
        self.computed < self.prompt.len()
    }
}
