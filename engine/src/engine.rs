//! Continuous batching: sequences join and leave between steps; each step mixes prompt chunks
//! (chunked prefill under a token budget) with one token for every running sequence.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::{AttentionSeq, Backend, KvRows};
use crate::block_pool::BlockId;
use crate::error::{EngineError, Result};
use crate::kv_cache::{BlockHash, KvCache, KvEvent, prefix_block_hashes};
use crate::model::{ForwardBatch, Model, PeerExport};
use crate::parallel::Parallelism;
use crate::sampling::{Logprobs, Sampler, SamplingParams};
use crate::sequence::{SeqId, Sequence, StopCriteria};
use crate::shared_kv::{PeerCache, PeerTarget, SharedKv};
use crate::tokenizer::{IncrementalText, Tokenizer};

/// Sizing of the KV cache and of each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks per layer.
    pub num_blocks: usize,
    /// Most tokens one step computes (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Keep computed prompt blocks cached by prefix hash after their sequence ends, and let
    /// later prompts with that prefix reuse them.
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 2048,
            max_batch_tokens: 512,
            max_running: 256,
            prefix_caching: true,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
        }
    }
}

/// One token produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub seq: SeqId,
    pub token: u32,
    pub logprobs: Logprobs,
    /// Text that became final with this token (empty without a tokenizer).
    pub text: String,
    /// Set on the sequence's last token; its blocks are already free.
    pub finish: Option<FinishReason>,
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    pub events: Vec<TokenEvent>,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
}

/// One layer of one exporting sequence's prompt KV, ready to send to a decode worker.
#[derive(Debug)]
pub struct LayerKv<'a> {
    pub seq: SeqId,
    pub layer: usize,
    /// Rows for prompt positions `0..len`, in order.
    pub rows: &'a KvRows,
}

/// A sequence whose blocks are reserved while its prompt KV arrives from a prefill worker.
struct Reservation {
    seq: Sequence,
    landed: Vec<bool>,
}

/// What one forward pass hands the sequences that get a token: greedy picks made by the
/// backend, or logit rows to sample on the host.
enum Picks {
    Greedy(std::vec::IntoIter<(u32, f32)>),
    Logits {
        logits: Vec<f32>,
        vocab: usize,
        next: usize,
    },
}

/// A model, its KV cache and the sequences sharing them.
pub struct Engine<B: Backend> {
    model: Model<B>,
    kv: KvCache<B>,
    tokenizer: Option<Arc<Tokenizer>>,
    config: EngineConfig,
    eos_token_ids: Vec<u32>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    reserved: HashMap<SeqId, Reservation>,
    seed_base: u64,
    cached_prompt_tokens: u64,
    /// Caches of other processes on this device that prompts' KV is written into.
    peers: PeerCache<B>,
    /// Where each prompt from [`Engine::add_prefill_request_to_peer`] writes its KV.
    peer_targets: HashMap<SeqId, PeerTarget<B>>,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .field("reserved", &self.reserved.len())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// Allocates the KV cache for `model`. With a tokenizer, events carry text and stop
    /// strings work.
    pub fn new(
        model: Model<B>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.block_size == 0
            || config.num_blocks == 0
            || config.max_batch_tokens == 0
            || config.max_running == 0
        {
            return Err(EngineError::InvalidRequest(format!(
                "engine config needs every size >= 1, got {config:?}"
            )));
        }
        let kv = model.new_kv_cache(config.num_blocks, config.block_size, config.prefix_caching)?;
        let c = model.config();
        let mut eos_token_ids = c.eos_token_ids.clone();
        if let Some(t) = &tokenizer {
            eos_token_ids.extend(t.eos_token_ids());
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        let seed_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Ok(Self {
            model,
            kv,
            tokenizer,
            config,
            eos_token_ids,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: HashMap::new(),
            seed_base,
            cached_prompt_tokens: 0,
            peers: PeerCache::default(),
            peer_targets: HashMap::new(),
        })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The end-of-sequence ids from config.json and tokenizer_config.json.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn free_blocks(&self) -> usize {
        self.kv.free_count()
    }

    pub fn used_blocks(&self) -> usize {
        self.kv.used_count()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences whose blocks are reserved while their KV arrives.
    pub fn num_reserved(&self) -> usize {
        self.reserved.len()
    }

    /// Prompt tokens not yet computed, over waiting and running sequences.
    pub fn queued_prefill_tokens(&self) -> usize {
        self.waiting
            .iter()
            .chain(&self.running)
            .map(|s| s.prompt.len().saturating_sub(s.computed))
            .sum()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Queues a request. It joins the running batch at the next step with room for it.
    pub fn add_request(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop: StopCriteria,
    ) -> Result<()> {
        self.validate(id, &prompt, &params, &stop)?;
        let seq = self.new_sequence(id, prompt, params, stop, false);
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Queues a prompt whose KV is sent elsewhere: [`Engine::step_exporting`] hands out each
    /// layer of its prompt KV as soon as it is computed, and its one event carries the first
    /// token, sampled with `params`.
    pub fn add_prefill_request(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<()> {
        let stop = StopCriteria {
            ignore_eos: true,
            ..StopCriteria::max_new_tokens(1)
        };
        self.validate(id, &prompt, &params, &stop)?;
        let seq = self.new_sequence(id, prompt, params, stop, true);
        self.waiting.push_back(seq);
        Ok(())
    }

    /// This engine's KV cache as another process on the same device opens it to write
    /// prompts' KV in place ([`Engine::add_prefill_request_to_peer`]); None where the backend
    /// cannot share memory or the cache is split over tensor-parallel ranks.
    pub fn share_kv(&self) -> Result<Option<Vec<u8>>> {
        let backend = self.model.backend();
        let Some(device) = backend.shareable_device() else {
            return Ok(None);
        };
        if !matches!(self.model.parallel, Parallelism::Single) {
            return Ok(None);
        }
        let layers = self
            .kv
            .layers
            .iter()
            .map(|store| backend.share_kv(store))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(
            SharedKv {
                device,
                block_size: self.kv.block_size,
                layers,
            }
            .encode(),
        ))
    }

    /// [`Engine::add_prefill_request`], but each layer of the prompt's KV is written straight
    /// into `blocks` (in position order) of the cache another process shared as `shared`
    /// ([`Engine::share_kv`]), and nothing is handed out. When the step that completes the
    /// prompt returns, every layer has landed. Fails with [`EngineError::Unsupported`] where
    /// that cache is not on this device or this engine's cache is split over ranks: send the
    /// KV through the host then.
    pub fn add_prefill_request_to_peer(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        shared: &[u8],
        blocks: &[u32],
    ) -> Result<()> {
        if !matches!(self.model.parallel, Parallelism::Single) {
            return Err(EngineError::Unsupported(
                "writing kv into a peer's cache from a parallel group".into(),
            ));
        }
        let target = self.peers.target(
            self.model.backend(),
            shared,
            blocks,
            prompt.len(),
            self.model.config().num_layers,
        )?;
        self.add_prefill_request(id, prompt, params)?;
        self.peer_targets.insert(id, target);
        Ok(())
    }

    /// Records that a peer on this device wrote every layer of a reserved sequence's prompt
    /// KV into its blocks ([`Engine::add_prefill_request_to_peer`] on the other side).
    pub fn mark_kv_landed(&mut self, id: SeqId) -> Result<()> {
        let reservation = self
            .reserved
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id.0))?;
        reservation.landed.fill(true);
        Ok(())
    }

    /// Reserves blocks for a sequence whose prompt KV a prefill worker will send; returns the
    /// blocks, in position order, that [`Engine::import_kv`] fills. Fails at once, rather than
    /// waiting, when the blocks or the running limit are not available now.
    pub fn reserve(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop: StopCriteria,
    ) -> Result<Vec<BlockId>> {
        self.validate(id, &prompt, &params, &stop)?;
        let limit = self.config.max_running;
        let busy = self.running.len() + self.reserved.len();
        if busy >= limit {
            return Err(EngineError::AtCapacity { busy, limit });
        }
        let needed = self.kv.blocks_for(prompt.len() + stop.max_new_tokens);
        let blocks = self.kv.allocate(needed).ok_or(EngineError::OutOfBlocks {
            needed,
            free: self.kv.free_count(),
            total: self.kv.total(),
        })?;
        let mut seq = self.new_sequence(id, prompt, params, stop, false);
        seq.blocks = blocks.clone();
        let landed = vec![false; self.model.config().num_layers];
        self.reserved.insert(id, Reservation { seq, landed });
        Ok(blocks)
    }

    /// Writes one layer of a reserved sequence's prompt KV: rows for positions `0..prompt
    /// len`. Checks the sequence, the layer and the size; a failed import leaves the blocks of
    /// other sequences untouched.
    pub fn import_kv(&mut self, id: SeqId, layer: usize, rows: &KvRows) -> Result<()> {
        let c = self.model.config();
        let width = self.model.local_kv_heads() * c.head_dim;
        let num_layers = c.num_layers;
        let reservation = self
            .reserved
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id.0))?;
        let tokens = reservation.seq.prompt.len();
        if layer >= num_layers {
            return Err(EngineError::InvalidRequest(format!(
                "kv for layer {layer}, but the model has {num_layers} layers"
            )));
        }
        if rows.k.len() != tokens * width || rows.v.len() != tokens * width {
            return Err(EngineError::InvalidRequest(format!(
                "kv for layer {layer} holds {} k and {} v values, expected {tokens} tokens × {width}",
                rows.k.len(),
                rows.v.len()
            )));
        }
        let slots: Vec<usize> = (0..tokens)
            .map(|p| self.kv.slot(&reservation.seq.blocks, p))
            .collect();
        self.model
            .backend()
            .load_kv(&mut self.kv.layers[layer], rows, &slots)?;
        reservation.landed[layer] = true;
        Ok(())
    }

    /// Starts decoding a reserved sequence whose every layer has landed, from the first
    /// token the prefill worker sampled. Returns that token's event (which may finish it).
    pub fn admit_prefilled(
        &mut self,
        id: SeqId,
        first_token: u32,
        logprobs: Logprobs,
    ) -> Result<TokenEvent> {
        let reservation = self
            .reserved
            .get(&id)
            .ok_or(EngineError::UnknownSequence(id.0))?;
        if let Some(missing) = reservation.landed.iter().position(|l| !l) {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {} cannot start: kv for layer {missing} has not arrived",
                id.0
            )));
        }
        let vocab = self.model.config().vocab_size;
        if first_token as usize >= vocab {
            return Err(EngineError::InvalidRequest(format!(
                "first token {first_token} is outside the vocabulary of {vocab}"
            )));
        }
        let Some(Reservation { mut seq, .. }) = self.reserved.remove(&id) else {
            return Err(EngineError::UnknownSequence(id.0));
        };
        seq.computed = seq.prompt.len();
        seq.sampler.replay_draw();
        let event = Self::accept_token(
            &mut seq,
            first_token,
            logprobs,
            &self.eos_token_ids,
            self.tokenizer.as_deref(),
        )?;
        if event.finish.is_some() {
            self.kv.release(&seq.blocks);
        } else {
            self.running.push(seq);
        }
        Ok(event)
    }

    /// Removes a sequence and frees its blocks. Returns false if it was not in the engine.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.peer_targets.remove(&id);
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(reservation) = self.reserved.remove(&id) {
            self.kv.release(&reservation.seq.blocks);
            return true;
        }
        match self.running.iter().position(|s| s.id == id) {
            Some(i) => {
                let seq = self.running.remove(i);
                self.kv.release(&seq.blocks);
                true
            }
            None => false,
        }
    }

    /// Logits at every position of `prompt` (`[len, vocab]`), computed outside the batch.
    pub fn score(&mut self, prompt: &[u32]) -> Result<Vec<f32>> {
        if self.model.runs_in_lockstep() {
            return Err(EngineError::Unsupported(
                "scoring outside the batch on one rank of an expert-parallel group".into(),
            ));
        }
        self.validate_tokens(prompt)?;
        let needed = self.kv.blocks_for(prompt.len());
        let blocks = self.kv.allocate(needed).ok_or(EngineError::OutOfBlocks {
            needed,
            free: self.kv.free_count(),
            total: self.kv.total(),
        })?;
        let batch = ForwardBatch {
            tokens: prompt.to_vec(),
            positions: (0..prompt.len() as u32).collect(),
            seqs: vec![AttentionSeq {
                rows: 0..prompt.len(),
                first_position: 0,
                block_table: &blocks,
            }],
            logit_rows: (0..prompt.len()).collect(),
            ..ForwardBatch::default()
        };
        let logits = self
            .model
            .forward(&batch, &mut self.kv, &mut |_, _, _| Ok(()));
        self.kv.release(&blocks);
        logits
    }

    /// Advances every running sequence by one token and feeds prompt chunks, admitting waiting
    /// sequences while blocks, the running limit and the token budget allow.
    pub fn step(&mut self) -> Result<StepOutput> {
        self.step_exporting(&mut |_| {})
    }

    /// [`Engine::step`], also handing `export` each layer of the prompt KV of every sequence
    /// from [`Engine::add_prefill_request`] whose prompt completes in this step, as soon as
    /// that layer is computed.
    pub fn step_exporting(&mut self, export: &mut dyn FnMut(LayerKv<'_>)) -> Result<StepOutput> {
        self.admit();
        let mut budget = self.config.max_batch_tokens;
        let mut batch = ForwardBatch::default();
        // (index into running, tokens scheduled) in batch order.
        let mut scheduled: Vec<(usize, usize)> = Vec::new();
        let (mut prefill_tokens, mut decode_tokens) = (0, 0);
        // Decode first: one token each keeps inter-token latency flat while prompts stream in.
        for pass_prefill in [false, true] {
            for (i, seq) in self.running.iter().enumerate() {
                if budget == 0 || seq.is_prefilling() != pass_prefill {
                    continue;
                }
                let n = (seq.len() - seq.computed).min(budget);
                budget -= n;
                if pass_prefill {
                    prefill_tokens += n;
                } else {
                    decode_tokens += n;
                }
                let start = batch.tokens.len();
                batch
                    .tokens
                    .extend((seq.computed..seq.computed + n).map(|p| seq.token_at(p)));
                batch
                    .positions
                    .extend((seq.computed..seq.computed + n).map(|p| p as u32));
                if seq.computed + n == seq.len() {
                    batch.logit_rows.push(start + n - 1);
                }
                batch.seqs.push(AttentionSeq {
                    rows: start..start + n,
                    first_position: seq.computed,
                    block_table: &seq.blocks,
                });
                scheduled.push((i, n));
            }
        }
        if scheduled.is_empty() {
            if self.model.runs_in_lockstep() {
                self.model.forward_idle()?;
            }
            return Ok(StepOutput::default());
        }
        // Every prompt that completes in this step and is sent elsewhere, and its cache slots:
        // handed out through the host, or written into a peer's cache.
        let mut exporting = Vec::new();
        for (seq, _) in scheduled
            .iter()
            .map(|&(i, n)| (&self.running[i], n))
            .filter(|(seq, n)| seq.export_kv && seq.computed + n == seq.prompt.len())
        {
            let slots = (0..seq.prompt.len())
                .map(|p| self.kv.slot(&seq.blocks, p))
                .collect();
            match self.peer_targets.get(&seq.id) {
                Some(target) => batch.peer_exports.push(PeerExport { slots, target }),
                None => {
                    exporting.push(seq.id);
                    batch.exports.push(slots);
                }
            }
        }
        let writes_peers = !batch.peer_exports.is_empty();
        // Plain greedy sequences take their token from the backend, so a GPU keeps the logits.
        let greedy = scheduled
            .iter()
            .map(|&(i, n)| (&self.running[i], n))
            .filter(|(seq, n)| seq.computed + n == seq.len())
            .all(|(seq, _)| seq.sampler.is_plain_greedy());
        let mut on_layer = |layer: usize, index: usize, rows: &KvRows| {
            export(LayerKv {
                seq: exporting[index],
                layer,
                rows,
            });
            Ok(())
        };
        let mut picks = if greedy {
            Picks::Greedy(
                self.model
                    .forward_greedy(&batch, &mut self.kv, &mut on_layer)?
                    .into_iter(),
            )
        } else {
            let logits = self.model.forward(&batch, &mut self.kv, &mut on_layer)?;
            Picks::Logits {
                logits,
                vocab: self.model.config().vocab_size,
                next: 0,
            }
        };
        if writes_peers {
            // The caller tells the peer its KV is there once this step returns.
            self.model.backend().synchronize()?;
        }
        let mut events = Vec::new();
        let mut finished = Vec::new();
        for (i, n) in scheduled {
            let seq = &mut self.running[i];
            seq.computed += n;
            Self::cache_computed_blocks(&mut self.kv, seq);
            if seq.computed < seq.len() {
                continue;
            }
            let eos = &self.eos_token_ids;
            let tokenizer = self.tokenizer.as_deref();
            let event = match &mut picks {
                Picks::Greedy(tokens) => {
                    let Some((token, chosen)) = tokens.next() else {
                        break;
                    };
                    let logprobs = Logprobs {
                        chosen,
                        top: Vec::new(),
                    };
                    Self::accept_token(seq, token, logprobs, eos, tokenizer)?
                }
                Picks::Logits {
                    logits,
                    vocab,
                    next,
                } => {
                    let Some(row) = logits.get(*next * *vocab..(*next + 1) * *vocab) else {
                        break;
                    };
                    *next += 1;
                    Self::advance(seq, row, eos, tokenizer)?
                }
            };
            if event.finish.is_some() {
                finished.push(seq.id);
            }
            events.push(event);
        }
        for id in finished {
            self.abort(id);
        }
        Ok(StepOutput {
            events,
            prefill_tokens,
            decode_tokens,
        })
    }

    /// Samples the next token of `seq` and applies its stop criteria.
    fn advance(
        seq: &mut Sequence,
        logits: &[f32],
        eos: &[u32],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<TokenEvent> {
        let (token, logprobs) = seq.sampler.sample(logits, &seq.prompt, &seq.output);
        Self::accept_token(seq, token, logprobs, eos, tokenizer)
    }

    /// Appends `token` to `seq` and applies its stop criteria.
    fn accept_token(
        seq: &mut Sequence,
        token: u32,
        logprobs: Logprobs,
        eos: &[u32],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<TokenEvent> {
        seq.output.push(token);
        let mut finish = None;
        if seq.stop.stop_token_ids.contains(&token)
            || (!seq.stop.ignore_eos && eos.contains(&token))
        {
            finish = Some(FinishReason::Stop);
        }
        let mut text = String::new();
        if let (Some(incremental), Some(tokenizer)) = (seq.text.as_mut(), tokenizer) {
            let (delta, stopped) = incremental.push(tokenizer, token)?;
            text = delta;
            if stopped {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && seq.output.len() >= seq.stop.max_new_tokens {
            finish = Some(FinishReason::Length);
        }
        if let (Some(_), Some(incremental)) = (finish, seq.text.as_mut()) {
            text.push_str(&incremental.flush());
        }
        Ok(TokenEvent {
            seq: seq.id,
            token,
            logprobs,
            text,
            finish,
        })
    }

    /// Moves waiting sequences into the running batch, oldest first, reserving the blocks for
    /// their whole prompt plus `max_new_tokens` so a running sequence never runs out.
    /// Leading prompt blocks found in the prefix cache are shared instead of computed; at
    /// least the prompt's last token is always computed, for its logits.
    fn admit(&mut self) {
        let block_size = self.kv.block_size;
        while self.running.len() < self.config.max_running {
            let Some(seq) = self.waiting.front() else {
                return;
            };
            let hashes = prefix_block_hashes(&seq.prompt, block_size);
            let needed = self
                .kv
                .blocks_for(seq.prompt.len() + seq.stop.max_new_tokens);
            let mut shared = self.kv.take_cached_prefix(&hashes);
            let usable = shared.len().min((seq.prompt.len() - 1) / block_size);
            let unusable = shared.split_off(usable);
            self.kv.release(&unusable);
            let Some(fresh) = self.kv.allocate(needed - usable) else {
                self.kv.release(&shared);
                return;
            };
            if let Some(mut seq) = self.waiting.pop_front() {
                shared.extend(fresh);
                seq.blocks = shared;
                seq.computed = usable * block_size;
                seq.block_hashes = hashes;
                seq.cached_blocks = usable;
                self.cached_prompt_tokens += seq.computed as u64;
                self.running.push(seq);
            }
        }
    }

    /// Caches every prompt block of `seq` that is now fully computed.
    fn cache_computed_blocks(kv: &mut KvCache<B>, seq: &mut Sequence) {
        while let Some(&hash) = seq.block_hashes.get(seq.cached_blocks) {
            if (seq.cached_blocks + 1) * kv.block_size > seq.computed {
                return;
            }
            kv.cache(hash, seq.blocks[seq.cached_blocks]);
            seq.cached_blocks += 1;
        }
    }

    /// Changes to the prefix cache since the last call (blocks stored and evicted).
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.kv.take_events()
    }

    /// Every prefix hash cached now.
    pub fn cached_block_hashes(&self) -> Vec<BlockHash> {
        self.kv.cached_hashes()
    }

    /// Prompt tokens taken from the prefix cache instead of computed, since start.
    pub fn cached_prompt_tokens(&self) -> u64 {
        self.cached_prompt_tokens
    }

    fn new_sequence(
        &self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop: StopCriteria,
        export_kv: bool,
    ) -> Sequence {
        let text = self
            .tokenizer
            .as_ref()
            .map(|_| IncrementalText::new(stop.stop_strings.clone()));
        let fallback_seed = self.seed_base ^ id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Sequence {
            id,
            prompt,
            output: Vec::new(),
            blocks: Vec::new(),
            computed: 0,
            sampler: Sampler::new(params, fallback_seed),
            stop,
            text,
            export_kv,
            block_hashes: Vec::new(),
            cached_blocks: 0,
        }
    }

    fn validate_tokens(&self, prompt: &[u32]) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("prompt is empty".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    fn validate(
        &self,
        id: SeqId,
        prompt: &[u32],
        params: &SamplingParams,
        stop: &StopCriteria,
    ) -> Result<()> {
        if self.reserved.contains_key(&id)
            || self.running.iter().chain(&self.waiting).any(|s| s.id == id)
        {
            return Err(EngineError::DuplicateSequence(id.0));
        }
        self.validate_tokens(prompt)?;
        params.validate()?;
        if stop.max_new_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "max_new_tokens must be >= 1, got 0".into(),
            ));
        }
        let total = prompt.len() + stop.max_new_tokens;
        let limit = self.model.config().max_position_embeddings;
        if total > limit {
            return Err(EngineError::InvalidRequest(format!(
                "prompt of {} tokens plus max_new_tokens {} is {total}, over the model's max_position_embeddings {limit}",
                prompt.len(),
                stop.max_new_tokens
            )));
        }
        let needed = self.kv.blocks_for(total);
        if needed > self.kv.total() {
            return Err(EngineError::OutOfBlocks {
                needed,
                free: self.kv.free_count(),
                total: self.kv.total(),
            });
        }
        if !stop.stop_strings.is_empty() && self.tokenizer.is_none() {
            return Err(EngineError::InvalidRequest(
                "stop strings need a tokenizer, and this engine has none".into(),
            ));
        }
        Ok(())
    }
}
