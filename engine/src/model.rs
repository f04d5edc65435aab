//! The MoE transformer forward pass, written once against [`Backend`].

use std::path::Path;

use crate::backend::{AttentionBatch, AttentionSeq, Backend, RopeTable, Routing};
use crate::checkpoint::{Checkpoint, LoadProgress};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::weights::{ExpertWeights, Mlp, ModelWeights, SparseMlp};

/// A loaded model on one backend.
pub struct Model<B: Backend> {
    pub(crate) config: ModelConfig,
    pub(crate) backend: B,
    pub(crate) weights: ModelWeights<B>,
}

/// The tokens one forward pass computes, each sequence's share of them (borrowing its block
/// table), and the rows whose logits are wanted.
#[derive(Debug, Clone, Default)]
pub(crate) struct ForwardBatch<'a> {
    pub(crate) tokens: Vec<u32>,
    pub(crate) positions: Vec<u32>,
    pub(crate) seqs: Vec<AttentionSeq<'a>>,
    pub(crate) logit_rows: Vec<usize>,
}

impl<B: Backend> Model<B> {
    /// Loads `config.json` and the safetensors weights in `dir` onto `backend`.
    pub fn load(dir: &Path, backend: B, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        let weights = ModelWeights::load(&backend, &checkpoint, &config, progress)?;
        Ok(Self {
            config,
            backend,
            weights,
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

    /// Runs `batch`, writing its K and V into `kv`, and returns the logits of
    /// `batch.logit_rows` as `[rows, vocab]`. `on_layer(l, store)` runs as soon as layer l's
    /// K and V are in the cache, so they can be sent on while later layers compute.
    pub(crate) fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache<B>,
        on_layer: &mut dyn FnMut(usize, &B::KvStore) -> Result<()>,
    ) -> Result<Vec<f32>> {
        match self.forward_logits(batch, kv, on_layer)? {
            Some(logits) => self.backend.to_host(&logits),
            None => Ok(Vec::new()),
        }
    }

    /// [`Self::forward`], but returns each logit row's greedy token and its logprob, picked
    /// by the backend (on the device, for a GPU) instead of the logits.
    pub(crate) fn forward_greedy(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache<B>,
        on_layer: &mut dyn FnMut(usize, &B::KvStore) -> Result<()>,
    ) -> Result<Vec<(u32, f32)>> {
        match self.forward_logits(batch, kv, on_layer)? {
            Some(logits) => self.backend.greedy(&logits, self.config.vocab_size),
            None => Ok(Vec::new()),
        }
    }

    /// The logits of `batch.logit_rows`, on the backend (None when no row is asked for).
    fn forward_logits(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache<B>,
        on_layer: &mut dyn FnMut(usize, &B::KvStore) -> Result<()>,
    ) -> Result<Option<B::Tensor>> {
        let b = &self.backend;
        let c = &self.config;
        let rope = RopeTable::new(&batch.positions, c.head_dim, c.rope_theta);
        let slots: Vec<usize> = batch
            .seqs
            .iter()
            .flat_map(|s| (0..s.rows.len()).map(|i| kv.slot(s.block_table, s.first_position + i)))
            .collect();
        let attention = AttentionBatch {
            seqs: &batch.seqs,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: kv.block_size,
        };

        let mut h = b.embed(&self.weights.embed, &batch.tokens)?;
        for (index, (layer, store)) in self.weights.layers.iter().zip(&mut kv.layers).enumerate() {
            let x = b.rms_norm(&h, &layer.input_norm, c.rms_norm_eps)?;
            let mut q = b.linear(&x, &layer.q.weight, layer.q.bias.as_ref())?;
            let mut k = b.linear(&x, &layer.k.weight, layer.k.bias.as_ref())?;
            let v = b.linear(&x, &layer.v.weight, layer.v.bias.as_ref())?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = b.rms_norm(&q, qn, c.rms_norm_eps)?;
                k = b.rms_norm(&k, kn, c.rms_norm_eps)?;
            }
            b.rope(&mut q, &rope)?;
            b.rope(&mut k, &rope)?;
            b.write_kv(store, &k, &v, &slots)?;
            on_layer(index, store)?;
            let attn = b.attention(&q, store, &attention)?;
            let o = b.linear(&attn, &layer.o.weight, layer.o.bias.as_ref())?;
            b.add_assign(&mut h, &o)?;

            let x = b.rms_norm(&h, &layer.post_attention_norm, c.rms_norm_eps)?;
            let mlp = match &layer.mlp {
                Mlp::Dense(mlp) => self.swiglu_mlp(&x, mlp)?,
                Mlp::Sparse(sparse) => self.sparse_mlp(&x, sparse)?,
            };
            b.add_assign(&mut h, &mlp)?;
        }
        if batch.logit_rows.is_empty() {
            return Ok(None);
        }
        let last = b.select_rows(&h, &batch.logit_rows)?;
        let last = b.rms_norm(&last, &self.weights.final_norm, c.rms_norm_eps)?;
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        b.linear(&last, head, None).map(Some)
    }

    fn swiglu_mlp(&self, x: &B::Tensor, mlp: &ExpertWeights<B>) -> Result<B::Tensor> {
        let b = &self.backend;
        let gate_up = b.linear(x, &mlp.gate_up, None)?;
        let act = b.swiglu(&gate_up)?;
        b.linear(&act, &mlp.down, None)
    }

    fn sparse_mlp(&self, x: &B::Tensor, sparse: &SparseMlp<B>) -> Result<B::Tensor> {
        let b = &self.backend;
        let logits = b.to_host(&b.linear(x, &sparse.router, None)?)?;
        let routing = route(&logits, &self.config);
        let mut out = b.moe_experts(x, &routing, &sparse.experts)?;
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

/// Softmax over each token's router logits, top-k, and (if the family says so) renormalized
/// weights. Ties go to the lower expert id, as `torch.topk` does on CPU.
pub(crate) fn route(logits: &[f32], config: &ModelConfig) -> Routing {
    let e = config.moe.num_experts;
    let k = config.moe.experts_per_token;
    let mut expert_ids = Vec::with_capacity(logits.len() / e * k);
    let mut weights = Vec::with_capacity(logits.len() / e * k);
    for row in logits.chunks_exact(e) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let chosen = &order[..k];
        let probs: Vec<f32> = chosen.iter().map(|&i| exp[i] / total).collect();
        let norm: f32 = if config.moe.norm_topk_prob {
            probs.iter().sum()
        } else {
            1.0
        };
        expert_ids.extend_from_slice(chosen);
        weights.extend(probs.iter().map(|p| p / norm));
    }
    Routing {
        experts_per_token: k,
        expert_ids,
        weights,
    }
}
