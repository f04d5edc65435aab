//! The narrow kernel interface the model is written against, and the choice of device.

use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::block_pool::BlockId;
use crate::checkpoint::HostTensor;
use crate::error::{EngineError, Result};
use crate::parallel::Collective;
use crate::parallel::host::host_collectives;
use crate::weights::ExpertWeights;

pub(crate) mod cpu;
pub(crate) mod cuda;

/// Kernels one device provides. Model code is written once against this trait; each backend
/// picks its own storage layouts and dtypes behind the associated types.
pub trait Backend: Send + Sync + Sized + 'static {
    /// 2-D activations, `[rows, cols]`.
    type Tensor: Send;
    /// A weight matrix `[out, in]` as the checkpoint stores it (the backend may re-layout it).
    type Matrix: Send + Sync;
    /// A 1-D weight: norm scales and biases.
    type Vector: Send + Sync;
    /// K and V storage of one layer's block pool.
    type KvStore: Send;
    /// One MoE layer's count of (token, expert) pairs per expert, kept where routing runs.
    type ExpertCounters: Send + Sync;
    /// Another process's KV store on this device, opened for writing (see
    /// [`Backend::share_kv`]).
    type PeerKv: Send + Sync;

    /// Short name for logs and benches.
    fn name(&self) -> &'static str;
    fn matrix(&self, host: HostTensor) -> Result<Self::Matrix>;
    fn vector(&self, host: Vec<f32>) -> Result<Self::Vector>;
    fn kv_store(&self, spec: &KvSpec) -> Result<Self::KvStore>;
    fn expert_counters(&self, experts: usize) -> Result<Self::ExpertCounters>;
    /// Adds pairs routed on the host (expert parallelism routes there).
    fn count_experts(&self, counters: &Self::ExpertCounters, expert_ids: &[usize]);
    fn read_expert_counters(&self, counters: &Self::ExpertCounters) -> Result<Vec<u64>>;

    /// Gathers rows of `table` (`[vocab, hidden]`).
    fn embed(&self, table: &Self::Matrix, ids: &[u32]) -> Result<Self::Tensor>;
    /// RMSNorm over each run of `weight.len()` values (a whole row, or one head).
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// `x · wᵀ + bias`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Matrix,
        bias: Option<&Self::Vector>,
    ) -> Result<Self::Tensor>;
    /// [`Self::linear`] of one input by a layer's q, k and v weights (with their biases); a
    /// backend may share work on the input between them.
    fn linear_qkv(
        &self,
        x: &Self::Tensor,
        projections: [(&Self::Matrix, Option<&Self::Vector>); 3],
    ) -> Result<[Self::Tensor; 3]> {
        let [q, k, v] = projections.map(|(w, bias)| self.linear(x, w, bias));
        Ok([q?, k?, v?])
    }
    fn add_assign(&self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// `h += delta`, then RMSNorm of `h`: a residual add and the norm after it, which a
    /// backend may do in one pass.
    fn add_rms_norm(
        &self,
        h: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Vector,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.add_assign(h, delta)?;
        self.rms_norm(h, weight, eps)
    }
    /// Multiplies row i by `scales[i]`.
    fn scale_rows(&self, x: &mut Self::Tensor, scales: &[f32]) -> Result<()>;
    /// `silu(gate) * up` for a `[rows, 2·I]` tensor holding gate then up.
    fn swiglu(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rotary position embedding (rotate-half form) applied to every head of every row.
    fn rope(&self, x: &mut Self::Tensor, table: &RopeTable) -> Result<()>;
    /// Writes row i of `k` and `v` into cache slot `slots[i]`.
    fn write_kv(
        &self,
        store: &mut Self::KvStore,
        k: &Self::Tensor,
        v: &Self::Tensor,
        slots: &[usize],
    ) -> Result<()>;
    /// A layer's projected `[q, k, v]` made ready for attention: q and k normed per head
    /// (where `heads` has norms) and rotated, k and v written to cache `slots`; returns q.
    /// A backend may do it all in one pass.
    fn attention_inputs(
        &self,
        qkv: [Self::Tensor; 3],
        heads: &HeadTransforms<'_, Self::Vector>,
        store: &mut Self::KvStore,
        slots: &[usize],
    ) -> Result<Self::Tensor> {
        attention_inputs_stepwise(self, qkv, heads, store, slots)
    }
    /// Copies the K and V rows in `slots` to the host, to send them to another worker.
    fn read_kv(&self, store: &Self::KvStore, slots: &[usize]) -> Result<KvRows>;
    /// Writes host K and V rows (received from another worker) into `slots`.
    fn load_kv(&self, store: &mut Self::KvStore, rows: &KvRows, slots: &[usize]) -> Result<()>;
    /// The device's unique id where stores can be shared with other processes on it.
    fn shareable_device(&self) -> Option<[u8; 16]> {
        None
    }
    /// A handle with which another process on this device writes into `store`
    /// ([`Backend::open_peer_kv`]), so KV moves device to device instead of through the host.
    fn share_kv(&self, _store: &Self::KvStore) -> Result<Vec<u8>> {
        Err(EngineError::Unsupported(format!(
            "the {} backend cannot share its kv cache",
            self.name()
        )))
    }
    /// Opens a store another process shared with [`Backend::share_kv`].
    fn open_peer_kv(&self, _handle: &[u8]) -> Result<Self::PeerKv> {
        Err(EngineError::Unsupported(format!(
            "the {} backend cannot open another process's kv cache",
            self.name()
        )))
    }
    /// Copies the K and V rows in `slots` into a peer's store at `peer_slots`. The copy may
    /// still be running when this returns: [`Backend::synchronize`] waits for it.
    fn write_peer_kv(
        &self,
        store: &Self::KvStore,
        slots: &[usize],
        peer: &Self::PeerKv,
        peer_slots: &[usize],
    ) -> Result<()>;
    /// Waits until every operation queued so far has finished on the device.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Causal grouped-query attention of `q` over the paged cache.
    fn attention(
        &self,
        q: &Self::Tensor,
        store: &Self::KvStore,
        batch: &AttentionBatch<'_>,
    ) -> Result<Self::Tensor>;
    /// Runs each token through its routed experts (grouped by expert) and returns the
    /// routing-weighted sum.
    fn moe_experts(
        &self,
        x: &Self::Tensor,
        routing: &Routing,
        experts: &[ExpertWeights<Self>],
    ) -> Result<Self::Tensor>;
    /// Routes each row of `x` by `rule` over its `router` logits, runs its experts as
    /// [`Backend::moe_experts`] does and counts the pairs in `counters`. Routes on the host
    /// unless a backend keeps the routing where the logits are.
    fn moe_routed(
        &self,
        x: &Self::Tensor,
        router: &Self::Matrix,
        rule: &RouteRule,
        experts: &[ExpertWeights<Self>],
        counters: &Self::ExpertCounters,
    ) -> Result<Self::Tensor> {
        moe_routed_on_host(self, x, router, rule, experts, counters)
    }
    /// [`Backend::moe_routed`]'s output added to the residual and normalized as
    /// [`Backend::add_rms_norm`] does: the next layer's input. A backend may sum the experts'
    /// outputs inside the norm.
    fn moe_routed_add_rms_norm(
        &self,
        x: &Self::Tensor,
        router: &Self::Matrix,
        rule: &RouteRule,
        experts: &[ExpertWeights<Self>],
        counters: &Self::ExpertCounters,
        norm: ResidualNorm<'_, Self>,
    ) -> Result<Self::Tensor> {
        let mlp = self.moe_routed(x, router, rule, experts, counters)?;
        self.add_rms_norm(norm.h, &mlp, norm.weight, norm.eps)
    }
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// `acc[rows[i]] += x[i]` for every row i of `x`.
    fn scatter_add_rows(
        &self,
        acc: &mut Self::Tensor,
        x: &Self::Tensor,
        rows: &[usize],
    ) -> Result<()>;
    /// `(rows, cols)` of `x`.
    fn shape(&self, x: &Self::Tensor) -> (usize, usize);
    /// A `[rows, cols]` tensor holding `data`.
    fn upload_tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<Self::Tensor>;
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// Connects ranks running on `backends` (rank r on `backends[r]`). Threads of one process
    /// exchanging host copies, unless a backend has a faster path; a rank waits at most
    /// `timeout` for a peer's part of a collective.
    fn group_collectives(
        backends: &[Self],
        timeout: std::time::Duration,
    ) -> Result<Vec<Box<dyn Collective<Self>>>> {
        Ok(host_collectives(backends.len(), timeout))
    }
    /// Each row's greedy token (ties to the lowest id) and its logprob, for rows of `vocab`
    /// logits. A device backend overrides this so the logits stay where they are.
    fn greedy(&self, logits: &Self::Tensor, vocab: usize) -> Result<Vec<(u32, f32)>> {
        Ok(self
            .to_host(logits)?
            .chunks_exact(vocab.max(1))
            .map(crate::sampling::greedy_pick)
            .collect())
    }
}

/// [`Backend::moe_routed`] with the router's logits brought to the host and routed there.
/// [`Backend::attention_inputs`] as separate norm, rotary and cache-write calls.
pub(crate) fn attention_inputs_stepwise<B: Backend>(
    b: &B,
    [mut q, mut k, v]: [B::Tensor; 3],
    heads: &HeadTransforms<'_, B::Vector>,
    store: &mut B::KvStore,
    slots: &[usize],
) -> Result<B::Tensor> {
    if let Some((q_norm, k_norm)) = heads.norms {
        q = b.rms_norm(&q, q_norm, heads.eps)?;
        k = b.rms_norm(&k, k_norm, heads.eps)?;
    }
    b.rope(&mut q, heads.rope)?;
    b.rope(&mut k, heads.rope)?;
    b.write_kv(store, &k, &v, slots)?;
    Ok(q)
}

pub(crate) fn moe_routed_on_host<B: Backend>(
    b: &B,
    x: &B::Tensor,
    router: &B::Matrix,
    rule: &RouteRule,
    experts: &[ExpertWeights<B>],
    counters: &B::ExpertCounters,
) -> Result<B::Tensor> {
    let logits = b.to_host(&b.linear(x, router, None)?)?;
    let routing = rule.route(&logits);
    b.count_experts(counters, &routing.expert_ids);
    b.moe_experts(x, &routing, experts)
}

/// Checks a scatter of `x` rows into `acc` at `rows`: matching widths, one place per row,
/// every place inside `acc`.
pub(crate) fn check_scatter_rows(
    acc: (usize, usize),
    x: (usize, usize),
    rows: &[usize],
) -> std::result::Result<(), String> {
    if x.1 != acc.1 || x.0 != rows.len() {
        return Err(format!(
            "[{}, {}] rows into [{}, {}] at {} places",
            x.0,
            x.1,
            acc.0,
            acc.1,
            rows.len()
        ));
    }
    match rows.iter().find(|&&r| r >= acc.0) {
        Some(bad) => Err(format!("row {bad} of {}", acc.0)),
        None => Ok(()),
    }
}

/// Shape of one layer's paged KV storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSpec {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// K and V of some cache slots on the host, each `[slots, num_kv_heads · head_dim]`, row i
/// belonging to the i-th slot asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvRows {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Every row's rotation angles (`position · inv_freq[i]`), shared by the queries and keys of
/// every layer of a forward pass. A host backend takes their cos and sin
/// ([`RopeTable::cos_sin`], computed once, on first use); a device backend may take the
/// positions and frequencies and compute them where the activations are.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub head_dim: usize,
    pub positions: Vec<u32>,
    /// `head_dim / 2` frequencies.
    pub inv_freq: Vec<f32>,
    cos_sin: OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl RopeTable {
    /// Angles for `positions` with the same float32 arithmetic as transformers' default
    /// rotary embedding.
    pub fn new(positions: &[u32], head_dim: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self {
            head_dim,
            positions: positions.to_vec(),
            inv_freq,
            cos_sin: OnceLock::new(),
        }
    }

    /// cos and sin of every angle, each `[rows, head_dim / 2]`.
    pub fn cos_sin(&self) -> (&[f32], &[f32]) {
        let (cos, sin) = self.cos_sin.get_or_init(|| {
            let (sin, cos) = self
                .positions
                .iter()
                .flat_map(|&p| self.inv_freq.iter().map(move |f| (p as f32 * f).sin_cos()))
                .unzip();
            (cos, sin)
        });
        (cos, sin)
    }

    pub fn rows(&self) -> usize {
        self.positions.len()
    }
}

/// One sequence's share of an attention call.
#[derive(Debug, Clone)]
pub struct AttentionSeq<'a> {
    /// Rows of `q` that belong to this sequence, in position order.
    pub rows: Range<usize>,
    /// Position of the first of those rows; earlier positions are already cached.
    pub first_position: usize,
    pub block_table: &'a [BlockId],
}

/// What happens to each head of a layer's q and k before attention: RMSNorm by
/// `(q_norm, k_norm)` where the family has them (Qwen3), then the rotary embedding.
#[derive(Debug, Clone)]
pub struct HeadTransforms<'a, V> {
    pub norms: Option<(&'a V, &'a V)>,
    pub eps: f32,
    pub rope: &'a RopeTable,
}

/// The residual stream `h` and the RMSNorm (`weight`, `eps`) an op's output goes through
/// next, as [`Backend::add_rms_norm`] takes them.
pub struct ResidualNorm<'a, B: Backend> {
    pub h: &'a mut B::Tensor,
    pub weight: &'a B::Vector,
    pub eps: f32,
}

/// Everything attention needs besides the tensors.
pub struct AttentionBatch<'a> {
    pub seqs: &'a [AttentionSeq<'a>],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// Top-k expert choice per token, `experts_per_token` entries per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts_per_token: usize,
    pub expert_ids: Vec<usize>,
    pub weights: Vec<f32>,
}

/// How a family turns router logits into experts: a softmax over every expert, the top
/// `experts_per_token`, and their weights renormalized to sum to 1 if `renormalize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRule {
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub renormalize: bool,
}

impl RouteRule {
    /// Routes each row of `num_experts` logits. Ties go to the lower expert id, as
    /// `torch.topk` does on CPU.
    pub fn route(&self, logits: &[f32]) -> Routing {
        let (e, k) = (self.num_experts, self.experts_per_token);
        let mut expert_ids = Vec::with_capacity(logits.len() / e.max(1) * k);
        let mut weights = Vec::with_capacity(logits.len() / e.max(1) * k);
        for row in logits.chunks_exact(e.max(1)) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
            let chosen = &order[..k];
            let probs: Vec<f32> = chosen.iter().map(|&i| exp[i] / total).collect();
            let norm: f32 = if self.renormalize {
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
}

/// (token, expert) pairs per expert, counted on the host.
#[derive(Debug)]
pub struct HostCounters(Vec<AtomicU64>);

impl HostCounters {
    pub fn new(experts: usize) -> Self {
        Self((0..experts).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn add(&self, expert_ids: &[usize]) {
        for &e in expert_ids {
            if let Some(c) = self.0.get(e) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn read(&self) -> Vec<u64> {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

/// What the operator asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

/// The device the engine will run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// `fallback_reason` says why `auto` did not pick CUDA.
    Cpu { fallback_reason: Option<String> },
    /// GPU `ordinal`, every CUDA library it needs found.
    Cuda { ordinal: usize },
}

impl DeviceChoice {
    /// Resolves the choice against what this machine offers: `auto` takes GPU 0 when CUDA
    /// works here and says why not otherwise; `cuda` fails with that reason.
    pub fn resolve(self) -> Result<Device> {
        if self == Self::Cpu {
            return Ok(Device::Cpu {
                fallback_reason: None,
            });
        }
        match (self, cuda::probe()) {
            (_, Ok(())) => Ok(Device::Cuda { ordinal: 0 }),
            (Self::Auto, Err(reason)) => Ok(Device::Cpu {
                fallback_reason: Some(reason),
            }),
            (_, Err(reason)) => Err(EngineError::DeviceUnavailable {
                device: "cuda".into(),
                reason,
            }),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!(
                "unknown device {other}; expected auto, cpu or cuda"
            )),
        }
    }
}
