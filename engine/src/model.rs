//! The MoE transformer forward pass, written once against [`Backend`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::{
    AttentionBatch, AttentionSeq, Backend, HeadTransforms, KvRows, KvSpec, ResidualNorm, RopeTable,
    RouteRule, Routing,
};
use crate::checkpoint::{Checkpoint, LoadProgress};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::parallel::expert::expert_parallel_moe;
use crate::parallel::tensor::Followers;
use crate::parallel::{Collective, Parallelism};
use crate::shared_kv::PeerTarget;
use crate::weights::{ExpertWeights, Mlp, ModelWeights, SparseMlp};

/// A loaded model (or one rank's share of it) on one backend.
pub struct Model<B: Backend> {
    pub(crate) config: ModelConfig,
    pub(crate) backend: B,
    pub(crate) weights: ModelWeights<B>,
    pub(crate) parallel: Parallelism,
    /// Declared before `followers` so that, on drop, peers see this rank leave first.
    pub(crate) comm: Option<Box<dyn Collective<B>>>,
    /// The other ranks of a tensor-parallel group, on the rank that drives it.
    pub(crate) followers: Option<Followers>,
    /// (token, expert) pairs this rank computed, per layer.
    expert_counters: Vec<B::ExpertCounters>,
    /// Set when a forward pass failed part-way: peers may be inside a collective this rank
    /// left, so the group cannot be trusted again.
    broken: AtomicBool,
}

/// The tokens one forward pass computes, each sequence's share of them (borrowing its block
/// table), the rows whose logits are wanted, and the cache slots of every prompt whose KV is
/// handed out layer by layer or written into a peer's cache.
pub(crate) struct ForwardBatch<'a, B: Backend> {
    pub(crate) tokens: Vec<u32>,
    pub(crate) positions: Vec<u32>,
    pub(crate) seqs: Vec<AttentionSeq<'a>>,
    pub(crate) logit_rows: Vec<usize>,
    pub(crate) exports: Vec<Vec<usize>>,
    pub(crate) peer_exports: Vec<PeerExport<'a, B>>,
}

impl<B: Backend> Default for ForwardBatch<'_, B> {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            positions: Vec::new(),
            seqs: Vec::new(),
            logit_rows: Vec::new(),
            exports: Vec::new(),
            peer_exports: Vec::new(),
        }
    }
}

/// A prompt whose K and V go from `slots` of this cache into its target's.
pub(crate) struct PeerExport<'a, B: Backend> {
    pub(crate) slots: Vec<usize>,
    pub(crate) target: &'a PeerTarget<B>,
}

/// Called with (layer, index into `ForwardBatch::exports`, that prompt's K and V rows for the
/// layer, whole heads) as soon as the layer is in the cache.
pub(crate) type OnExport<'a> = dyn FnMut(usize, usize, &KvRows) -> Result<()> + 'a;

/// A layer's MLP output on its way into the residual stream.
enum MlpOut<T> {
    /// To be added to h by the next norm.
    Pending(T),
    /// Already added, and h normalized by the next norm: the next layer's input.
    Normed(T),
}

impl<B: Backend> Model<B> {
    /// Loads `config.json` and the safetensors weights in `dir` onto `backend`.
    pub fn load(dir: &Path, backend: B, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        Self::load_rank(dir, backend, Parallelism::Single, None, progress)
    }

    /// Loads one rank's share of the model in `dir`: only the slices `parallel` gives it are
    /// read from the checkpoint. `comm` connects it to the other ranks.
    pub fn load_rank(
        dir: &Path,
        backend: B,
        parallel: Parallelism,
        comm: Option<Box<dyn Collective<B>>>,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        if let Some(comm) = &comm
            && (comm.rank(), comm.size()) != (parallel.rank(), parallel.size())
        {
            return Err(EngineError::Config(format!(
                "rank {} of {} cannot join a group as rank {} of {}",
                parallel.rank(),
                parallel.size(),
                comm.rank(),
                comm.size()
            )));
        }
        if parallel.size() > 1 && comm.is_none() {
            return Err(EngineError::Config(format!(
                "a group of {} ranks needs a collective",
                parallel.size()
            )));
        }
        let checkpoint = Checkpoint::open(dir)?;
        let weights = ModelWeights::load(&backend, &checkpoint, &config, &parallel, progress)?;
        let expert_counters = (0..config.num_layers)
            .map(|_| backend.expert_counters(config.moe.num_experts))
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            backend,
            weights,
            parallel,
            comm,
            followers: None,
            expert_counters,
            broken: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn parallelism(&self) -> &Parallelism {
        &self.parallel
    }

    /// KV heads this rank stores: all of them, or its tensor-parallel share (one, when there
    /// are more ranks than heads and each head is held by several ranks).
    pub fn local_kv_heads(&self) -> usize {
        (self.config.num_kv_heads / self.parallel.tensor_shard().1).max(1)
    }

    /// Ranks holding each KV head: 1 unless there are more tensor-parallel ranks than heads.
    fn kv_head_replicas(&self) -> usize {
        (self.parallel.tensor_shard().1 / self.config.num_kv_heads).max(1)
    }

    /// Whether the ranks of this model's group must all run a forward pass every step (each
    /// MoE block exchanges tokens with every rank).
    pub(crate) fn runs_in_lockstep(&self) -> bool {
        matches!(self.parallel, Parallelism::Expert { .. }) && self.parallel.size() > 1
    }

    /// (token, expert) pairs this rank has computed, per layer and expert:
    /// `[layer · num_experts + expert]`.
    pub fn expert_load(&self) -> Result<Vec<u64>> {
        let experts = self.config.moe.num_experts;
        let mut load = Vec::with_capacity(self.expert_counters.len() * experts);
        for counters in &self.expert_counters {
            let mut layer = self.backend.read_expert_counters(counters)?;
            layer.resize(experts, 0);
            load.extend(layer);
        }
        Ok(load)
    }

    /// Counts pairs that `layer`'s experts computed after host routing.
    pub(crate) fn count_expert_pairs(&self, layer: usize, expert_ids: &[usize]) {
        if let Some(counters) = self.expert_counters.get(layer) {
            self.backend.count_experts(counters, expert_ids);
        }
    }

    pub(crate) fn route_rule(&self) -> RouteRule {
        RouteRule {
            num_experts: self.config.moe.num_experts,
            experts_per_token: self.config.moe.experts_per_token,
            renormalize: self.config.moe.norm_topk_prob,
        }
    }

    /// The KV cache for this rank (and, on a tensor-parallel leader, for every follower).
    pub(crate) fn new_kv_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        prefix_caching: bool,
    ) -> Result<KvCache<B>> {
        let spec = KvSpec {
            num_blocks,
            block_size,
            num_kv_heads: self.local_kv_heads(),
            head_dim: self.config.head_dim,
        };
        if let Some(followers) = &self.followers {
            followers.allocate(self.config.num_layers, spec)?;
        }
        KvCache::new(&self.backend, self.config.num_layers, spec, prefix_caching)
    }

    /// Runs `batch`, writing its K and V into `kv`, and returns the logits of
    /// `batch.logit_rows` as `[rows, vocab]`. `on_export` runs as soon as each layer's K and V
    /// are in the cache, so they can be sent on while later layers compute.
    pub(crate) fn forward(
        &self,
        batch: &ForwardBatch<'_, B>,
        kv: &mut KvCache<B>,
        on_export: &mut OnExport<'_>,
    ) -> Result<Vec<f32>> {
        match self.forward_logits(batch, kv, on_export)? {
            Some(logits) => self.backend.to_host(&logits),
            None => Ok(Vec::new()),
        }
    }

    /// [`Self::forward`], but returns each logit row's greedy token and its logprob, picked
    /// by the backend (on the device, for a GPU) instead of the logits.
    pub(crate) fn forward_greedy(
        &self,
        batch: &ForwardBatch<'_, B>,
        kv: &mut KvCache<B>,
        on_export: &mut OnExport<'_>,
    ) -> Result<Vec<(u32, f32)>> {
        match self.forward_logits(batch, kv, on_export)? {
            Some(logits) => self.backend.greedy(&logits, self.config.vocab_size),
            None => Ok(Vec::new()),
        }
    }

    /// The logits of `batch.logit_rows`, on the backend (None when no row is asked for).
    /// In a group, a failure leaves the group unusable: peers may wait in a collective.
    pub(crate) fn forward_logits(
        &self,
        batch: &ForwardBatch<'_, B>,
        kv: &mut KvCache<B>,
        on_export: &mut OnExport<'_>,
    ) -> Result<Option<B::Tensor>> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(EngineError::Collective(
                "an earlier forward pass failed part-way through, so this rank's group is out of step; restart the worker".into(),
            ));
        }
        if let Some(followers) = &self.followers {
            followers.forward(batch)?;
        }
        let result = self.run_layers(batch, kv, on_export);
        if result.is_err() && self.parallel.size() > 1 {
            self.broken.store(true, Ordering::Relaxed);
        }
        result.map_err(|e| match &self.followers {
            Some(followers) => followers.explain(e),
            None => e,
        })
    }

    /// A lockstep rank's pass with no tokens of its own: it still takes part in every MoE
    /// block's exchange, so its peers' tokens reach the experts it holds.
    pub(crate) fn forward_idle(&self) -> Result<()> {
        let empty = self
            .backend
            .upload_tensor(0, self.config.hidden_size, Vec::new())?;
        for (index, layer) in self.weights.layers.iter().enumerate() {
            if let Mlp::Sparse(sparse) = &layer.mlp {
                self.sparse_mlp(index, &empty, sparse)?;
            }
        }
        Ok(())
    }

    fn run_layers(
        &self,
        batch: &ForwardBatch<'_, B>,
        kv: &mut KvCache<B>,
        on_export: &mut OnExport<'_>,
    ) -> Result<Option<B::Tensor>> {
        let b = &self.backend;
        let c = &self.config;
        let rope = RopeTable::new(&batch.positions, c.head_dim, c.rope_theta);
        let slots: Vec<usize> = batch
            .seqs
            .iter()
            .flat_map(|s| (0..s.rows.len()).map(|i| kv.slot(s.block_table, s.first_position + i)))
            .collect();
        let tp = self.parallel.tensor_shard().1;
        let attention = AttentionBatch {
            seqs: &batch.seqs,
            num_heads: c.num_heads / tp,
            num_kv_heads: self.local_kv_heads(),
            head_dim: c.head_dim,
            block_size: kv.block_size,
        };

        let mut h = b.embed(&self.weights.embed, &batch.tokens)?;
        let final_norm = &self.weights.final_norm;
        let every_row = batch.logit_rows.iter().copied().eq(0..batch.tokens.len());
        // The last layer's MLP output, added to h by the next norm (or by the MLP itself).
        let mut mlp_out: Option<MlpOut<B::Tensor>> = None;
        for (index, (layer, store)) in self.weights.layers.iter().zip(&mut kv.layers).enumerate() {
            let x = match mlp_out.take() {
                Some(MlpOut::Normed(x)) => x,
                Some(MlpOut::Pending(mlp)) => {
                    b.add_rms_norm(&mut h, &mlp, &layer.input_norm, c.rms_norm_eps)?
                }
                None => b.rms_norm(&h, &layer.input_norm, c.rms_norm_eps)?,
            };
            let projections = [&layer.q, &layer.k, &layer.v].map(|p| (&p.weight, p.bias.as_ref()));
            let qkv = b.linear_qkv(&x, projections)?;
            let heads = HeadTransforms {
                norms: layer.q_norm.as_ref().zip(layer.k_norm.as_ref()),
                eps: c.rms_norm_eps,
                rope: &rope,
            };
            let q = b.attention_inputs(qkv, &heads, store, &slots)?;
            for (i, export) in batch.exports.iter().enumerate() {
                let rows = self.read_whole_heads(store, export)?;
                on_export(index, i, &rows)?;
            }
            for export in &batch.peer_exports {
                let peer = &export.target.peer.layers[index];
                b.write_peer_kv(store, &export.slots, peer, &export.target.slots)?;
            }
            let attn = b.attention(&q, store, &attention)?;
            let mut o = b.linear(&attn, &layer.o.weight, layer.o.bias.as_ref())?;
            self.reduce_tensor_parallel(&mut o)?;
            let x = b.add_rms_norm(&mut h, &o, &layer.post_attention_norm, c.rms_norm_eps)?;
            // The norm after this MLP: the next layer's, or the final one where every row
            // wants logits.
            let next_norm = match self.weights.layers.get(index + 1) {
                Some(next) => Some(&next.input_norm),
                None => every_row.then_some(final_norm),
            };
            // One rank's routed experts alone: their sum goes into h and the next norm at once.
            let alone = |sparse: &SparseMlp<B>| {
                self.comm.is_none() && sparse.shared.is_none() && b.shape(&x).0 > 0
            };
            mlp_out = Some(match (&layer.mlp, next_norm) {
                (Mlp::Sparse(sparse), Some(norm)) if alone(sparse) => {
                    MlpOut::Normed(b.moe_routed_add_rms_norm(
                        &x,
                        &sparse.router,
                        &self.route_rule(),
                        &sparse.experts,
                        &self.expert_counters[index],
                        ResidualNorm {
                            h: &mut h,
                            weight: norm,
                            eps: c.rms_norm_eps,
                        },
                    )?)
                }
                _ => {
                    let mut mlp = match &layer.mlp {
                        Mlp::Dense(mlp) => self.swiglu_mlp(&x, mlp)?,
                        Mlp::Sparse(sparse) => self.sparse_mlp(index, &x, sparse)?,
                    };
                    self.reduce_tensor_parallel(&mut mlp)?;
                    MlpOut::Pending(mlp)
                }
            });
        }
        if batch.logit_rows.is_empty() {
            return Ok(None);
        }
        let last = match mlp_out {
            Some(MlpOut::Normed(x)) => x,
            // A decode step wants every row: the last add and the final norm in one call.
            Some(MlpOut::Pending(mlp)) if every_row => {
                b.add_rms_norm(&mut h, &mlp, final_norm, c.rms_norm_eps)?
            }
            pending => {
                if let Some(MlpOut::Pending(mlp)) = pending {
                    b.add_assign(&mut h, &mlp)?;
                }
                let last = b.select_rows(&h, &batch.logit_rows)?;
                b.rms_norm(&last, final_norm, c.rms_norm_eps)?
            }
        };
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        b.linear(&last, head, None).map(Some)
    }

    fn swiglu_mlp(&self, x: &B::Tensor, mlp: &ExpertWeights<B>) -> Result<B::Tensor> {
        let b = &self.backend;
        let gate_up = b.linear(x, &mlp.gate_up, None)?;
        let act = b.swiglu(&gate_up)?;
        b.linear(&act, &mlp.down, None)
    }

    /// Sums a tensor-parallel rank's partial output over the group.
    fn reduce_tensor_parallel(&self, x: &mut B::Tensor) -> Result<()> {
        match (&self.parallel, &self.comm) {
            (Parallelism::Tensor { .. }, Some(comm)) => comm.all_reduce_sum(&self.backend, x),
            _ => Ok(()),
        }
    }

    /// K and V of `slots` with every KV head: a tensor-parallel rank holds a slice of the
    /// heads, so the group gathers them (every rank takes part).
    fn read_whole_heads(&self, store: &B::KvStore, slots: &[usize]) -> Result<KvRows> {
        let local = self.backend.read_kv(store, slots)?;
        let (Parallelism::Tensor { .. }, Some(comm)) = (&self.parallel, &self.comm) else {
            return Ok(local);
        };
        let replicas = self.kv_head_replicas();
        let join = |parts: Vec<Vec<f32>>| {
            // One copy of each head: the first of the ranks holding it.
            let parts: Vec<Vec<f32>> = parts.into_iter().step_by(replicas).collect();
            let width = parts[0].len() / slots.len().max(1);
            (0..slots.len())
                .flat_map(|t| {
                    parts
                        .iter()
                        .flat_map(move |p| p[t * width..(t + 1) * width].iter().copied())
                })
                .collect()
        };
        Ok(KvRows {
            k: join(comm.all_gather_host(&self.backend, &local.k)?),
            v: join(comm.all_gather_host(&self.backend, &local.v)?),
        })
    }

    pub(crate) fn route(&self, x: &B::Tensor, sparse: &SparseMlp<B>) -> Result<Routing> {
        let b = &self.backend;
        if b.shape(x).0 == 0 {
            return Ok(Routing {
                experts_per_token: self.config.moe.experts_per_token,
                expert_ids: Vec::new(),
                weights: Vec::new(),
            });
        }
        let logits = b.to_host(&b.linear(x, &sparse.router, None)?)?;
        Ok(self.route_rule().route(&logits))
    }

    fn sparse_mlp(&self, layer: usize, x: &B::Tensor, sparse: &SparseMlp<B>) -> Result<B::Tensor> {
        let b = &self.backend;
        let mut out = match (&self.parallel, &self.comm) {
            (Parallelism::Expert { placement, .. }, Some(comm)) => {
                expert_parallel_moe(self, layer, x, sparse, placement, comm.as_ref())?
            }
            _ if b.shape(x).0 == 0 => b.upload_tensor(0, self.config.hidden_size, Vec::new())?,
            _ => b.moe_routed(
                x,
                &sparse.router,
                &self.route_rule(),
                &sparse.experts,
                &self.expert_counters[layer],
            )?,
        };
        if b.shape(x).0 == 0 {
            return Ok(out);
        }
        if let Some(shared) = &sparse.shared {
            let mut y = self.swiglu_mlp(x, &shared.mlp)?;
            let gates: Vec<f32> = b
                .to_host(&b.linear(x, &shared.gate, None)?)?
                .into_iter()
                .map(|g| 1.0 / (1.0 + (-g).exp()))
                .collect();
            b.scale_rows(&mut y, &gates)?;
            b.add_assign(&mut out, &y)?;
        }
        Ok(out)
    }
}
