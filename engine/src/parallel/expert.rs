//! Expert parallelism with data-parallel attention: each rank serves its own requests with
//! replicated attention, and every MoE block sends each token to the ranks that hold its
//! experts (dispatch), runs the experts there, and sends the weighted outputs back (combine).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{Backend, KvRows, Routing};
use crate::block_pool::BlockId;
use crate::engine::{Engine, EngineConfig, LayerKv, StepOutput, TokenEvent};
use crate::error::{EngineError, Result};
use crate::kv_cache::{BlockHash, KvEvent};
use crate::model::Model;
use crate::parallel::{Collective, ExpertPlacement, collective_error};
use crate::sampling::{Logprobs, SamplingParams};
use crate::sequence::{SeqId, StopCriteria};
use crate::tokenizer::Tokenizer;
use crate::weights::SparseMlp;

/// The tokens bound for one rank: (token row, its (expert, weight) pairs held there).
type Outgoing = Vec<(usize, Vec<(usize, f32)>)>;

/// One MoE block across the group. Each token travels once to every rank holding one of its
/// experts, with the (expert, weight) pairs to run there as metadata; the rank returns the
/// weighted sum of those experts' outputs for the token.
pub(crate) fn expert_parallel_moe<B: Backend>(
    model: &Model<B>,
    layer: usize,
    x: &B::Tensor,
    sparse: &SparseMlp<B>,
    placement: &ExpertPlacement,
    comm: &dyn Collective<B>,
) -> Result<B::Tensor> {
    let b = model.backend();
    let (tokens, hidden) = b.shape(x);
    let routing = model.route(x, sparse)?;
    let k = routing.experts_per_token;
    let mut outgoing: Vec<Outgoing> = vec![Vec::new(); comm.size()];
    for token in 0..tokens {
        for j in token * k..(token + 1) * k {
            let (expert, weight) = (routing.expert_ids[j], routing.weights[j]);
            let to = &mut outgoing[placement.owner[expert]];
            match to.last_mut() {
                Some((t, pairs)) if *t == token => pairs.push((expert, weight)),
                _ => to.push((token, vec![(expert, weight)])),
            }
        }
    }
    let send_rows: Vec<usize> = outgoing.iter().flatten().map(|(t, _)| *t).collect();
    let counts: Vec<usize> = outgoing.iter().map(Vec::len).collect();
    // Per token: the pair count, then each pair's expert id and weight (ids < 2^24 are
    // exact in f32).
    let metadata = outgoing
        .iter()
        .map(|to| {
            to.iter()
                .flat_map(|(_, pairs)| {
                    std::iter::once(pairs.len() as f32)
                        .chain(pairs.iter().flat_map(|&(e, w)| [e as f32, w]))
                })
                .collect()
        })
        .collect();
    let metadata = comm.all_to_all_host(b, metadata)?;
    let (received, received_counts) =
        comm.all_to_all_v(b, &b.select_rows(x, &send_rows)?, &counts)?;
    let received_rows = b.shape(&received).0;

    // Expand the received tokens into one row per (token, local expert) pair.
    let (mut pair_rows, mut experts, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    let mut received_experts = Vec::new();
    let mut row = 0;
    for (from, values) in metadata.iter().enumerate() {
        let mut i = 0;
        while i < values.len() {
            let n = values[i] as usize;
            let pairs = values.get(i + 1..i + 1 + 2 * n).ok_or_else(|| {
                collective_error(format!("truncated routing metadata from rank {from}"))
            })?;
            for pair in pairs.chunks_exact(2) {
                let expert = pair[0] as usize;
                let local = sparse.local_index.get(expert).copied().flatten().ok_or_else(|| {
                    collective_error(format!(
                        "rank {from} sent a token for expert {expert}, which this rank does not hold"
                    ))
                })?;
                received_experts.push(expert);
                pair_rows.push(row);
                experts.push(local);
                weights.push(pair[1]);
            }
            i += 1 + 2 * n;
            row += 1;
        }
    }
    model.count_expert_pairs(layer, &received_experts);
    if row != received_rows {
        return Err(collective_error(format!(
            "routing metadata names {row} tokens, {received_rows} arrived"
        )));
    }
    let mut computed = b.upload_tensor(received_rows, hidden, vec![0.0; received_rows * hidden])?;
    if !pair_rows.is_empty() {
        let pairs = b.select_rows(&received, &pair_rows)?;
        let routing = Routing {
            experts_per_token: 1,
            expert_ids: experts,
            weights,
        };
        let y = b.moe_experts(&pairs, &routing, &sparse.experts)?;
        b.scatter_add_rows(&mut computed, &y, &pair_rows)?;
    }
    let (returned, _) = comm.all_to_all_v(b, &computed, &received_counts)?;
    let mut out = b.upload_tensor(tokens, hidden, vec![0.0; tokens * hidden])?;
    if !send_rows.is_empty() {
        b.scatter_add_rows(&mut out, &returned, &send_rows)?;
    }
    Ok(out)
}

/// The engines of one worker: one per data-parallel rank, each with its own requests and KV
/// cache, stepped together (with experts split over the ranks, every rank runs one forward
/// pass per step, an empty one if it has no work, so the MoE exchanges line up). Requests go
/// to the least busy rank. A group of one is a plain engine (which may itself drive a
/// tensor-parallel group).
pub struct EngineGroup<B: Backend> {
    ranks: Vec<Engine<B>>,
    /// Which rank each live sequence is on.
    home: HashMap<SeqId, usize>,
}

impl<B: Backend> std::fmt::Debug for EngineGroup<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineGroup")
            .field("ranks", &self.ranks)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> EngineGroup<B> {
    /// A group of one engine.
    pub fn single(engine: Engine<B>) -> Self {
        Self {
            ranks: vec![engine],
            home: HashMap::new(),
        }
    }

    /// One engine per model (data-parallel rank), each with a KV cache sized by `config`.
    pub fn new(
        models: Vec<Model<B>>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: EngineConfig,
    ) -> Result<Self> {
        if models.is_empty() {
            return Err(EngineError::Config("an engine group needs a model".into()));
        }
        let ranks = models
            .into_iter()
            .map(|model| Engine::new(model, tokenizer.clone(), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ranks,
            home: HashMap::new(),
        })
    }

    pub fn ranks(&self) -> &[Engine<B>] {
        &self.ranks
    }

    /// Rank 0's model: the configuration every rank shares.
    pub fn model(&self) -> &Model<B> {
        self.ranks[0].model()
    }

    fn sum(&self, count: impl Fn(&Engine<B>) -> usize) -> usize {
        self.ranks.iter().map(count).sum()
    }

    pub fn num_running(&self) -> usize {
        self.sum(Engine::num_running)
    }

    pub fn num_waiting(&self) -> usize {
        self.sum(Engine::num_waiting)
    }

    pub fn num_reserved(&self) -> usize {
        self.sum(Engine::num_reserved)
    }

    pub fn queued_prefill_tokens(&self) -> usize {
        self.sum(Engine::queued_prefill_tokens)
    }

    pub fn used_blocks(&self) -> usize {
        self.sum(Engine::used_blocks)
    }

    pub fn free_blocks(&self) -> usize {
        self.sum(Engine::free_blocks)
    }

    /// Prefix-cache changes of every rank since the last call. A prefix cached on two
    /// ranks and evicted from one reads as evicted: routers then underestimate, never
    /// overestimate, what is cached.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.ranks
            .iter_mut()
            .flat_map(Engine::take_kv_events)
            .collect()
    }

    /// Every prefix hash cached on any rank.
    pub fn cached_block_hashes(&self) -> Vec<BlockHash> {
        let mut hashes: Vec<BlockHash> = self
            .ranks
            .iter()
            .flat_map(Engine::cached_block_hashes)
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    /// Prompt tokens taken from prefix caches instead of computed, since start.
    pub fn cached_prompt_tokens(&self) -> u64 {
        self.ranks.iter().map(Engine::cached_prompt_tokens).sum()
    }

    /// The rank with the fewest sequences (ties to the lowest rank).
    fn least_busy(&self) -> usize {
        (0..self.ranks.len())
            .min_by_key(|&r| {
                let e = &self.ranks[r];
                e.num_running() + e.num_waiting() + e.num_reserved()
            })
            .unwrap_or(0)
    }

    /// Runs `add` on the least busy rank and remembers that rank as `id`'s home.
    fn place<T>(&mut self, id: SeqId, add: impl FnOnce(&mut Engine<B>) -> Result<T>) -> Result<T> {
        if self.home.contains_key(&id) {
            return Err(EngineError::DuplicateSequence(id.0));
        }
        let rank = self.least_busy();
        let added = add(&mut self.ranks[rank])?;
        self.home.insert(id, rank);
        Ok(added)
    }

    fn home_of(&mut self, id: SeqId) -> Result<&mut Engine<B>> {
        let rank = *self
            .home
            .get(&id)
            .ok_or(EngineError::UnknownSequence(id.0))?;
        Ok(&mut self.ranks[rank])
    }

    /// [`Engine::add_request`] on the least busy rank.
    pub fn add_request(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop: StopCriteria,
    ) -> Result<()> {
        self.place(id, |engine| engine.add_request(id, prompt, params, stop))
    }

    /// [`Engine::add_prefill_request`] on the least busy rank.
    pub fn add_prefill_request(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<()> {
        self.place(id, |engine| engine.add_prefill_request(id, prompt, params))
    }

    /// [`Engine::share_kv`] of a group of one; a group of several shares nothing (a
    /// reservation's rank is not known in advance).
    pub fn share_kv(&self) -> Result<Option<Vec<u8>>> {
        match &self.ranks[..] {
            [engine] => engine.share_kv(),
            _ => Ok(None),
        }
    }

    /// [`Engine::add_prefill_request_to_peer`] on the least busy rank.
    pub fn add_prefill_request_to_peer(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        shared: &[u8],
        blocks: &[u32],
    ) -> Result<()> {
        self.place(id, |engine| {
            engine.add_prefill_request_to_peer(id, prompt, params, shared, blocks)
        })
    }

    pub fn mark_kv_landed(&mut self, id: SeqId) -> Result<()> {
        self.home_of(id)?.mark_kv_landed(id)
    }

    /// [`Engine::reserve`] on the least busy rank.
    pub fn reserve(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop: StopCriteria,
    ) -> Result<Vec<BlockId>> {
        self.place(id, |engine| engine.reserve(id, prompt, params, stop))
    }

    pub fn import_kv(&mut self, id: SeqId, layer: usize, rows: &KvRows) -> Result<()> {
        self.home_of(id)?.import_kv(id, layer, rows)
    }

    pub fn admit_prefilled(
        &mut self,
        id: SeqId,
        first_token: u32,
        logprobs: Logprobs,
    ) -> Result<TokenEvent> {
        let event = self
            .home_of(id)?
            .admit_prefilled(id, first_token, logprobs)?;
        if event.finish.is_some() {
            self.home.remove(&id);
        }
        Ok(event)
    }

    pub fn abort(&mut self, id: SeqId) -> bool {
        match self.home.remove(&id) {
            Some(rank) => self.ranks[rank].abort(id),
            None => false,
        }
    }

    pub fn has_work(&self) -> bool {
        self.ranks.iter().any(Engine::has_work)
    }

    /// One step of every rank, run side by side (their MoE exchanges meet in the middle).
    pub fn step(&mut self) -> Result<StepOutput> {
        self.step_exporting(&mut |_| {})
    }

    /// [`Engine::step_exporting`] on every rank; `export` may be called from any rank's
    /// thread (one call at a time).
    pub fn step_exporting(
        &mut self,
        export: &mut (dyn FnMut(LayerKv<'_>) + Send),
    ) -> Result<StepOutput> {
        if !self.has_work() {
            return Ok(StepOutput::default());
        }
        let results: Vec<Result<StepOutput>> = if let [engine] = &mut self.ranks[..] {
            vec![engine.step_exporting(export)]
        } else {
            let export = Mutex::new(export);
            let export = &export;
            std::thread::scope(|s| {
                let running: Vec<_> = self
                    .ranks
                    .iter_mut()
                    .map(|engine| {
                        s.spawn(move || {
                            engine.step_exporting(&mut |kv| {
                                let mut export =
                                    export.lock().unwrap_or_else(PoisonError::into_inner);
                                export(kv)
                            })
                        })
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(collective_error("a rank's step panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        let mut merged = StepOutput::default();
        for result in results {
            let output = result?;
            merged.prefill_tokens += output.prefill_tokens;
            merged.decode_tokens += output.decode_tokens;
            merged.events.extend(output.events);
        }
        for event in &merged.events {
            if event.finish.is_some() {
                self.home.remove(&event.seq);
            }
        }
        Ok(merged)
    }
}
