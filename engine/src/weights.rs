//! The canonical weight layout, normalized once at load from each family's tensor names.

use std::collections::HashSet;

use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, HostTensor, LoadProgress};
use crate::config::{Family, ModelConfig};
use crate::error::{EngineError, Result};

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
    pub(crate) experts: Vec<ExpertWeights<B>>,
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

/// Reads tensors by name, tracking which ones were used so leftovers can be reported.
struct Loader<'a, B: Backend> {
    backend: &'a B,
    checkpoint: &'a Checkpoint,
    used: HashSet<String>,
    progress: &'a mut dyn FnMut(LoadProgress),
}

impl<B: Backend> ModelWeights<B> {
    pub(crate) fn load(
        backend: &B,
        checkpoint: &Checkpoint,
        config: &ModelConfig,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let mut loader = Loader {
            backend,
            checkpoint,
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

impl<B: Backend> Loader<'_, B> {
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let tensor = self.checkpoint.tensor(name, shape)?;
        self.used.insert(name.to_owned());
        (self.progress)(LoadProgress {
            tensors_loaded: self.used.len(),
            tensors_total: self.checkpoint.len(),
        });
        Ok(tensor)
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
    ) -> Result<Linear<B>> {
        Ok(Linear {
            weight: self.matrix(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: if bias {
                Some(self.vector(&format!("{prefix}.bias"), out_dim)?)
            } else {
                None
            },
        })
    }

    /// Fuses separate gate and up projections into one `[2·I, H]` matrix.
    fn swiglu(
        &mut self,
        names: [&str; 3],
        hidden: usize,
        width: usize,
    ) -> Result<ExpertWeights<B>> {
        let [gate, up, down] = names;
        let mut gate_up = self.host(gate, &[width, hidden])?;
        gate_up.data.extend(self.host(up, &[width, hidden])?.data);
        gate_up.shape = vec![2 * width, hidden];
        Ok(ExpertWeights {
            gate_up: self.backend.matrix(gate_up)?,
            down: self.matrix(down, &[hidden, width])?,
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

    /// Experts in transformers 5's fused in-memory layout: `gate_up_proj [E, 2·I, H]` and
    /// `down_proj [E, H, I]`.
    fn fused_experts(
        &mut self,
        prefix: &str,
        config: &ModelConfig,
    ) -> Result<Vec<ExpertWeights<B>>> {
        let (e, h, i) = (
            config.moe.num_experts,
            config.hidden_size,
            config.moe.expert_intermediate_size,
        );
        let gate_up = self.host(&format!("{prefix}.gate_up_proj"), &[e, 2 * i, h])?;
        let down = self.host(&format!("{prefix}.down_proj"), &[e, h, i])?;
        gate_up
            .data
            .chunks_exact(2 * i * h)
            .zip(down.data.chunks_exact(h * i))
            .map(|(gu, d)| {
                Ok(ExpertWeights {
                    gate_up: self.backend.matrix(HostTensor {
                        shape: vec![2 * i, h],
                        data: gu.to_vec(),
                    })?,
                    down: self.backend.matrix(HostTensor {
                        shape: vec![h, i],
                        data: d.to_vec(),
                    })?,
                })
            })
            .collect()
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
        let experts = if self
            .checkpoint
            .contains(&format!("{block}.experts.gate_up_proj"))
        {
            self.fused_experts(&format!("{block}.experts"), config)?
        } else {
            (0..e)
                .map(|x| {
                    let p = format!("{block}.experts.{x}");
                    match config.family {
                        Family::Mixtral => self.swiglu(
                            [
                                &format!("{p}.w1.weight"),
                                &format!("{p}.w3.weight"),
                                &format!("{p}.w2.weight"),
                            ],
                            h,
                            width,
                        ),
                        Family::Qwen3Moe | Family::Qwen2Moe => self.qwen_mlp(&p, h, width),
                    }
                })
                .collect::<Result<_>>()?
        };
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
            shared,
        })
    }

    fn layer(&mut self, config: &ModelConfig, index: usize) -> Result<LayerWeights<B>> {
        let p = format!("model.layers.{index}");
        let h = config.hidden_size;
        let (qw, kvw) = (config.q_width(), config.kv_width());
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
            q: self.linear(&format!("{p}.self_attn.q_proj"), qw, h, config.qkv_bias)?,
            k: self.linear(&format!("{p}.self_attn.k_proj"), kvw, h, config.qkv_bias)?,
            v: self.linear(&format!("{p}.self_attn.v_proj"), kvw, h, config.qkv_bias)?,
            o: self.linear(&format!("{p}.self_attn.o_proj"), h, qw, config.o_bias)?,
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
