//! The canonical weight layout, normalized once at load from each family's tensor names.

use std::collections::HashSet;
use std::ops::Range;

use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, HostTensor, LoadProgress};
use crate::config::{Family, ModelConfig};
use crate::error::{EngineError, Result};
use crate::parallel::Parallelism;

/// Tensors some exporters leave in checkpoints that carry nothing the forward pass needs.
const IGNORED_SUFFIXES: &[&str] = &["rotary_emb.inv_freq"];

/// A projection with an optional bias.
pub(crate) struct Linear<B: Backend> {
    pub(crate) weight: B::Matrix,
    pub(crate) bias: Option<B::Vector>,
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`, gate and up fused into one `[2·I, H]` matrix.
pub struct ExpertWeights<B: Backend> {
    pub gate_up: B::Matrix,
    pub down: B::Matrix,
}

/// Qwen2-MoE's always-on expert, scaled per token by `sigmoid(gate · x)`.
pub(crate) struct SharedExpert<B: Backend> {
    pub(crate) mlp: ExpertWeights<B>,
    pub(crate) gate: B::Matrix,
}

/// A sparse MoE block.
pub(crate) struct SparseMlp<B: Backend> {
    pub(crate) router: B::Matrix,
    /// The experts this rank holds, in id order (all of them unless experts are split).
    pub(crate) experts: Vec<ExpertWeights<B>>,
    /// Global expert id → index into `experts`, None for experts other ranks hold.
    pub(crate) local_index: Vec<Option<usize>>,
    pub(crate) shared: Option<SharedExpert<B>>,
}

/// The feed-forward half of a layer.
pub(crate) enum Mlp<B: Backend> {
    Dense(ExpertWeights<B>),
    Sparse(SparseMlp<B>),
}

/// One decoder layer.
pub(crate) struct LayerWeights<B: Backend> {
    pub(crate) input_norm: B::Vector,
    pub(crate) q: Linear<B>,
    pub(crate) k: Linear<B>,
    pub(crate) v: Linear<B>,
    pub(crate) o: Linear<B>,
    pub(crate) q_norm: Option<B::Vector>,
    pub(crate) k_norm: Option<B::Vector>,
    pub(crate) post_attention_norm: B::Vector,
    pub(crate) mlp: Mlp<B>,
}

/// Every weight of the model, on the backend's device.
pub(crate) struct ModelWeights<B: Backend> {
    pub(crate) embed: B::Matrix,
    pub(crate) layers: Vec<LayerWeights<B>>,
    pub(crate) final_norm: B::Vector,
    /// `None` when tied to `embed`.
    pub(crate) lm_head: Option<B::Matrix>,
}

/// How a tensor-parallel rank slices a projection.
#[derive(Clone, Copy)]
enum Split {
    /// Its share of the output features (rows): q, gate, up.
    Out,
    /// Its KV heads' rows of k and v: a share, or one head when there are more ranks than
    /// KV heads (each head is then held by several ranks).
    KvHeads,
    /// Its share of the input features (columns): o and down, whose partial outputs the
    /// ranks then sum.
    In,
}

/// Reads tensors by name, tracking which ones were used so leftovers can be reported.
struct Loader<'a, B: Backend> {
    backend: &'a B,
    checkpoint: &'a Checkpoint,
    parallel: &'a Parallelism,
    kv_heads: usize,
    used: HashSet<String>,
    progress: &'a mut dyn FnMut(LoadProgress),
}

impl<B: Backend> ModelWeights<B> {
    pub(crate) fn load(
        backend: &B,
        checkpoint: &Checkpoint,
        config: &ModelConfig,
        parallel: &Parallelism,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        check_parallelism(config, parallel)?;
        let mut loader = Loader {
            backend,
            checkpoint,
            parallel,
            kv_heads: config.num_kv_heads,
            used: HashSet::new(),
            progress,
        };
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let embed = loader.matrix("model.embed_tokens.weight", &[vocab, hidden])?;
        let layers = (0..config.num_layers)
            .map(|i| loader.layer(config, i))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = loader.vector("model.norm.weight", hidden)?;
        let lm_head = if config.tie_word_embeddings {
            loader.skip("lm_head.weight");
            None
        } else {
            Some(loader.matrix("lm_head.weight", &[vocab, hidden])?)
        };
        loader.reject_leftovers()?;
        Ok(Self {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }
}

/// Checks that every sharded dimension divides evenly over the tensor-parallel ranks, and
/// that an expert placement fits the model.
fn check_parallelism(config: &ModelConfig, parallel: &Parallelism) -> Result<()> {
    match parallel {
        Parallelism::Single => Ok(()),
        Parallelism::Tensor { rank, size } => {
            let mut dims = vec![("num_attention_heads", config.num_heads)];
            if size % config.num_kv_heads != 0 {
                dims.push(("num_key_value_heads", config.num_kv_heads));
            }
            if config.sparse_layers.iter().any(|&s| s) {
                dims.push(("moe_intermediate_size", config.moe.expert_intermediate_size));
            }
            if config.sparse_layers.iter().any(|&s| !s) {
                dims.push(("intermediate_size", config.dense_intermediate_size));
            }
            if let Some(width) = config.moe.shared_expert_intermediate_size {
                dims.push(("shared_expert_intermediate_size", width));
            }
            if *size == 0 || rank >= size {
                return Err(EngineError::Config(format!(
                    "tensor-parallel rank {rank} of {size} does not exist"
                )));
            }
            match dims.iter().find(|(_, d)| d % size != 0) {
                Some((name, d)) => Err(EngineError::Config(format!(
                    "tensor parallelism {size} needs {name} divisible by {size}, the model has {d}"
                ))),
                None => Ok(()),
            }
        }
        Parallelism::Expert { rank, placement } => {
            placement
                .validate(config.moe.num_experts)
                .map_err(|reason| EngineError::Config(format!("expert placement {reason}")))?;
            if *rank >= placement.ranks {
                return Err(EngineError::Config(format!(
                    "expert-parallel rank {rank} of {} does not exist",
                    placement.ranks
                )));
            }
            Ok(())
        }
    }
}

impl<B: Backend> Loader<'_, B> {
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let whole: Vec<Range<usize>> = shape.iter().map(|&d| 0..d).collect();
        self.host_part(name, shape, &whole)
    }

    /// Reads only the box `ranges` (one range per axis) of tensor `name`.
    fn host_part(
        &mut self,
        name: &str,
        shape: &[usize],
        ranges: &[Range<usize>],
    ) -> Result<HostTensor> {
        let tensor = self.checkpoint.tensor_part(name, shape, ranges)?;
        self.used.insert(name.to_owned());
        (self.progress)(LoadProgress {
            tensors_loaded: self.used.len(),
            tensors_total: self.checkpoint.len(),
        });
        Ok(tensor)
    }

    /// This rank's tensor-parallel share of `len` features.
    fn share(&self, len: usize) -> Range<usize> {
        let (rank, size) = self.parallel.tensor_shard();
        rank * len / size..(rank + 1) * len / size
    }

    /// The rows of k and v (KV heads × head_dim) this rank holds.
    fn kv_share(&self, rows: usize) -> Range<usize> {
        let (rank, size) = self.parallel.tensor_shard();
        let heads = self.kv_heads;
        if heads.is_multiple_of(size) {
            return self.share(rows);
        }
        let head = rank * heads / size;
        let width = rows / heads;
        head * width..(head + 1) * width
    }

    /// A `[out, in]` matrix, sliced as `split` says.
    fn split_matrix(&mut self, name: &str, shape: [usize; 2], split: Split) -> Result<B::Matrix> {
        let [out, inner] = shape;
        let ranges = match split {
            Split::Out => [self.share(out), 0..inner],
            Split::KvHeads => [self.kv_share(out), 0..inner],
            Split::In => [0..out, self.share(inner)],
        };
        let host = self.host_part(name, &shape, &ranges)?;
        self.backend.matrix(host)
    }

    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<B::Matrix> {
        let host = self.host(name, shape)?;
        self.backend.matrix(host)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<B::Vector> {
        let host = self.host(name, &[len])?;
        self.backend.vector(host.data)
    }

    fn skip(&mut self, name: &str) {
        if self.checkpoint.contains(name) {
            self.used.insert(name.to_owned());
        }
    }

    fn linear(
        &mut self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        split: Split,
    ) -> Result<Linear<B>> {
        let weight = self.split_matrix(&format!("{prefix}.weight"), [out_dim, in_dim], split)?;
        let bias_name = format!("{prefix}.bias");
        let bias = match (bias, split) {
            (false, _) => None,
            (true, Split::Out | Split::KvHeads) => {
                let range = match split {
                    Split::KvHeads => self.kv_share(out_dim),
                    _ => self.share(out_dim),
                };
                let host = self.host_part(&bias_name, &[out_dim], &[range])?;
                Some(self.backend.vector(host.data)?)
            }
            // Added once, by rank 0, since the ranks' outputs are summed.
            (true, Split::In) if self.parallel.tensor_shard().0 != 0 => {
                self.skip(&bias_name);
                None
            }
            (true, _) => Some(self.vector(&bias_name, out_dim)?),
        };
        Ok(Linear { weight, bias })
    }

    /// Fuses separate gate and up projections into one `[2·I, H]` matrix (this rank's share
    /// of I under tensor parallelism).
    fn swiglu(
        &mut self,
        names: [&str; 3],
        hidden: usize,
        width: usize,
    ) -> Result<ExpertWeights<B>> {
        let [gate, up, down] = names;
        let part = self.share(width);
        let mut gate_up = self.host_part(gate, &[width, hidden], &[part.clone(), 0..hidden])?;
        gate_up.data.extend(
            self.host_part(up, &[width, hidden], &[part.clone(), 0..hidden])?
                .data,
        );
        gate_up.shape = vec![2 * part.len(), hidden];
        Ok(ExpertWeights {
            gate_up: self.backend.matrix(gate_up)?,
            down: self.split_matrix(down, [hidden, width], Split::In)?,
        })
    }

    fn qwen_mlp(&mut self, prefix: &str, hidden: usize, width: usize) -> Result<ExpertWeights<B>> {
        self.swiglu(
            [
                &format!("{prefix}.gate_proj.weight"),
                &format!("{prefix}.up_proj.weight"),
                &format!("{prefix}.down_proj.weight"),
            ],
            hidden,
            width,
        )
    }

    /// Expert `expert` in transformers 5's fused in-memory layout: `gate_up_proj [E, 2·I, H]`
    /// and `down_proj [E, H, I]`.
    fn fused_expert(
        &mut self,
        prefix: &str,
        config: &ModelConfig,
        expert: usize,
    ) -> Result<ExpertWeights<B>> {
        let (e, h, i) = (
            config.moe.num_experts,
            config.hidden_size,
            config.moe.expert_intermediate_size,
        );
        let part = self.share(i);
        let one = expert..expert + 1;
        let gate_up_name = format!("{prefix}.gate_up_proj");
        let shape = [e, 2 * i, h];
        let mut gate_up =
            self.host_part(&gate_up_name, &shape, &[one.clone(), part.clone(), 0..h])?;
        let up = part.start + i..part.end + i;
        gate_up.data.extend(
            self.host_part(&gate_up_name, &shape, &[one.clone(), up, 0..h])?
                .data,
        );
        gate_up.shape = vec![2 * part.len(), h];
        let mut down = self.host_part(
            &format!("{prefix}.down_proj"),
            &[e, h, i],
            &[one, 0..h, part.clone()],
        )?;
        down.shape = vec![h, part.len()];
        Ok(ExpertWeights {
            gate_up: self.backend.matrix(gate_up)?,
            down: self.backend.matrix(down)?,
        })
    }

    fn sparse(&mut self, config: &ModelConfig, layer: &str) -> Result<SparseMlp<B>> {
        let (h, e, width) = (
            config.hidden_size,
            config.moe.num_experts,
            config.moe.expert_intermediate_size,
        );
        let block = match config.family {
            Family::Mixtral => format!("{layer}.block_sparse_moe"),
            Family::Qwen3Moe | Family::Qwen2Moe => format!("{layer}.mlp"),
        };
        let router = self.matrix(&format!("{block}.gate.weight"), &[e, h])?;
        let fused = self
            .checkpoint
            .contains(&format!("{block}.experts.gate_up_proj"));
        let mut experts = Vec::new();
        let mut local_index = vec![None; e];
        for (x, local) in local_index.iter_mut().enumerate() {
            let p = format!("{block}.experts.{x}");
            let names = match config.family {
                Family::Mixtral => ["w1", "w3", "w2"].map(|w| format!("{p}.{w}.weight")),
                Family::Qwen3Moe | Family::Qwen2Moe => {
                    ["gate_proj", "up_proj", "down_proj"].map(|w| format!("{p}.{w}.weight"))
                }
            };
            if !self.parallel.owns_expert(x) {
                // Another rank holds it; the fused tensors are read (in part) for the others.
                names.iter().for_each(|n| self.skip(n));
                continue;
            }
            *local = Some(experts.len());
            experts.push(if fused {
                self.fused_expert(&format!("{block}.experts"), config, x)?
            } else {
                let [gate, up, down] = &names;
                self.swiglu([gate, up, down], h, width)?
            });
        }
        if fused {
            self.skip(&format!("{block}.experts.gate_up_proj"));
            self.skip(&format!("{block}.experts.down_proj"));
        }
        let shared = match config.moe.shared_expert_intermediate_size {
            Some(width) => Some(SharedExpert {
                mlp: self.qwen_mlp(&format!("{block}.shared_expert"), h, width)?,
                gate: self.matrix(&format!("{block}.shared_expert_gate.weight"), &[1, h])?,
            }),
            None => None,
        };
        Ok(SparseMlp {
            router,
            experts,
            local_index,
            shared,
        })
    }

    fn layer(&mut self, config: &ModelConfig, index: usize) -> Result<LayerWeights<B>> {
        let p = format!("model.layers.{index}");
        let h = config.hidden_size;
        let (qw, kvw) = (config.q_width(), config.kv_width());
        let attn = |name: &str| format!("{p}.self_attn.{name}");
        let qk_norm = |loader: &mut Self, which: &str| -> Result<Option<B::Vector>> {
            if config.qk_norm {
                Ok(Some(loader.vector(
                    &format!("{p}.self_attn.{which}.weight"),
                    config.head_dim,
                )?))
            } else {
                Ok(None)
            }
        };
        Ok(LayerWeights {
            input_norm: self.vector(&format!("{p}.input_layernorm.weight"), h)?,
            q: self.linear(&attn("q_proj"), qw, h, config.qkv_bias, Split::Out)?,
            k: self.linear(&attn("k_proj"), kvw, h, config.qkv_bias, Split::KvHeads)?,
            v: self.linear(&attn("v_proj"), kvw, h, config.qkv_bias, Split::KvHeads)?,
            o: self.linear(&attn("o_proj"), h, qw, config.o_bias, Split::In)?,
            q_norm: qk_norm(self, "q_norm")?,
            k_norm: qk_norm(self, "k_norm")?,
            post_attention_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            mlp: if config.sparse_layers[index] {
                Mlp::Sparse(self.sparse(config, &p)?)
            } else {
                Mlp::Dense(self.qwen_mlp(&format!("{p}.mlp"), h, config.dense_intermediate_size)?)
            },
        })
    }

    /// A tensor the engine did not read means a model variant it does not implement.
    fn reject_leftovers(&self) -> Result<()> {
        let total = self.checkpoint.len();
        if self.used.len() == total {
            return Ok(());
        }
        let mut leftovers: Vec<&str> = self
            .checkpoint
            .names()
            .filter(|n| !self.used.contains(*n) && !IGNORED_SUFFIXES.iter().any(|s| n.ends_with(s)))
            .collect();
        if leftovers.is_empty() {
            return Ok(());
        }
        leftovers.sort_unstable();
        let shown: Vec<&str> = leftovers.iter().take(5).copied().collect();
        Err(EngineError::Unsupported(format!(
            "checkpoint has {} tensors the engine does not use, e.g. {}",
            leftovers.len(),
            shown.join(", ")
        )))
    }
}
