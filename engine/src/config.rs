//! `config.json` for the supported MoE families, normalized into one [`ModelConfig`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// The model families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen3Moe,
    Mixtral,
    Qwen2Moe,
}

/// The dtype the checkpoint declares for its weights (`dtype` or the older `torch_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

/// Mixture-of-experts shape of the sparse layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub expert_intermediate_size: usize,
    /// Renormalize the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
    /// Qwen2-MoE: one always-on expert of this width, scaled by a sigmoid gate.
    pub shared_expert_intermediate_size: Option<usize>,
}

/// A validated model configuration, identical in meaning whichever spelling the file used.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Qwen3 `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Width of the dense MLP used by layers that are not sparse.
    pub dense_intermediate_size: usize,
    pub moe: MoeConfig,
    /// `sparse_layers[i]` is true when layer i uses the MoE block.
    pub sparse_layers: Vec<bool>,
    pub dtype: WeightDtype,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and validates `config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|source| EngineError::Json { path, source })?;
        Self::from_json(&value)
    }

    /// Validates a parsed `config.json`.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| EngineError::Config("top level is not a JSON object".into()))?;
        let fields = Fields(obj);
        let family = family(&fields)?;
        fields.reject_unsupported(family)?;

        let hidden_size = fields.usize("hidden_size")?;
        let num_heads = fields.usize("num_attention_heads")?;
        let num_kv_heads = fields
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_heads);
        let head_dim = match fields.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(EngineError::Config(format!(
                    "head_dim is absent and hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                )));
            }
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(EngineError::Config(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let num_layers = fields.usize("num_hidden_layers")?;
        let intermediate_size = fields.usize("intermediate_size")?;
        let moe = MoeConfig {
            num_experts: fields.usize_any(&["num_experts", "num_local_experts"])?,
            experts_per_token: fields.usize("num_experts_per_tok")?,
            expert_intermediate_size: match family {
                Family::Mixtral => intermediate_size,
                Family::Qwen3Moe | Family::Qwen2Moe => fields.usize("moe_intermediate_size")?,
            },
            norm_topk_prob: match family {
                Family::Mixtral => true,
                Family::Qwen3Moe | Family::Qwen2Moe => {
                    fields.opt_bool("norm_topk_prob")?.unwrap_or(false)
                }
            },
            shared_expert_intermediate_size: match family {
                Family::Qwen2Moe => fields
                    .opt_usize("shared_expert_intermediate_size")?
                    .filter(|&n| n > 0),
                Family::Qwen3Moe | Family::Mixtral => None,
            },
        };
        if moe.experts_per_token == 0 || moe.experts_per_token > moe.num_experts {
            return Err(EngineError::Config(format!(
                "num_experts_per_tok {} must be in 1..={} (the number of experts)",
                moe.experts_per_token, moe.num_experts
            )));
        }
        let sparse_layers = sparse_layers(&fields, family, num_layers, moe.num_experts)?;
        let attention_bias = fields.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2Moe => (fields.opt_bool("qkv_bias")?.unwrap_or(true), false),
            Family::Qwen3Moe => (attention_bias, attention_bias),
            Family::Mixtral => (false, false),
        };
        Ok(Self {
            family,
            vocab_size: fields.usize("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: fields.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: rope_theta(&fields, family)? as f32,
            max_position_embeddings: fields
                .opt_usize("max_position_embeddings")?
                .unwrap_or(32768),
            tie_word_embeddings: fields.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: family == Family::Qwen3Moe,
            dense_intermediate_size: intermediate_size,
            moe,
            sparse_layers,
            dtype: dtype(&fields)?,
            eos_token_ids: token_ids(obj.get("eos_token_id"), "eos_token_id")?,
        })
    }

    /// Width of the q projection output.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the k (and v) projection output.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

fn family(fields: &Fields<'_>) -> Result<Family> {
    let model_type = fields.opt_str("model_type")?;
    let architecture = fields
        .0
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    match (model_type, architecture) {
        (Some("qwen3_moe"), _) | (None, Some("Qwen3MoeForCausalLM")) => Ok(Family::Qwen3Moe),
        (Some("mixtral"), _) | (None, Some("MixtralForCausalLM")) => Ok(Family::Mixtral),
        (Some("qwen2_moe"), _) | (None, Some("Qwen2MoeForCausalLM")) => Ok(Family::Qwen2Moe),
        (model_type, architecture) => Err(EngineError::Unsupported(format!(
            "model_type {} (architecture {}); supported: qwen3_moe, mixtral, qwen2_moe",
            model_type.unwrap_or("<absent>"),
            architecture.unwrap_or("<absent>")
        ))),
    }
}

/// `rope_theta` at top level (transformers 4.x) or inside `rope_parameters` (5.x).
fn rope_theta(fields: &Fields<'_>, family: Family) -> Result<f64> {
    let nested = fields
        .0
        .get("rope_parameters")
        .and_then(Value::as_object)
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64);
    let default = match family {
        Family::Mixtral => 1e6,
        Family::Qwen3Moe | Family::Qwen2Moe => 1e4,
    };
    Ok(nested.or(fields.opt_f64("rope_theta")?).unwrap_or(default))
}

fn dtype(fields: &Fields<'_>) -> Result<WeightDtype> {
    let name = match fields.opt_str("dtype")? {
        Some(name) => Some(name),
        None => fields.opt_str("torch_dtype")?,
    };
    match name {
        None | Some("float32") => Ok(WeightDtype::F32),
        Some("bfloat16") => Ok(WeightDtype::Bf16),
        Some("float16") => Ok(WeightDtype::F16),
        Some(other) => Err(EngineError::Unsupported(format!(
            "dtype {other}; supported: float32, bfloat16, float16"
        ))),
    }
}

/// Which layers are sparse: Qwen's `mlp_only_layers` and `decoder_sparse_step`; Mixtral is
/// sparse everywhere.
fn sparse_layers(
    fields: &Fields<'_>,
    family: Family,
    num_layers: usize,
    num_experts: usize,
) -> Result<Vec<bool>> {
    if family == Family::Mixtral {
        return Ok(vec![true; num_layers]);
    }
    let step = fields.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    let dense_only: Vec<usize> = match fields.0.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    EngineError::Config(format!("mlp_only_layers holds {v}, not a layer index"))
                })
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(EngineError::Config(format!(
                "mlp_only_layers is {other}, not a list of layer indices"
            )));
        }
    };
    Ok((0..num_layers)
        .map(|i| !dense_only.contains(&i) && num_experts > 0 && step > 0 && (i + 1) % step == 0)
        .collect())
}

fn token_ids(value: Option<&Value>, field: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| EngineError::Config(format!("{field} holds {v}, not a token id")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

/// Typed access to the fields of `config.json`, with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn present(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        self.present(name)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    EngineError::Config(format!("{name} is {v}, expected a non-negative integer"))
                })
            })
            .transpose()
    }

    fn usize(&self, name: &str) -> Result<usize> {
        self.opt_usize(name)?
            .ok_or_else(|| EngineError::Config(format!("required field {name} is missing")))
    }

    fn usize_any(&self, names: &[&str]) -> Result<usize> {
        for name in names {
            if let Some(n) = self.opt_usize(name)? {
                return Ok(n);
            }
        }
        Err(EngineError::Config(format!(
            "required field {} is missing",
            names.join(" or ")
        )))
    }

    fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        self.present(name)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| EngineError::Config(format!("{name} is {v}, expected a number")))
            })
            .transpose()
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        self.present(name)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    EngineError::Config(format!("{name} is {v}, expected a boolean"))
                })
            })
            .transpose()
    }

    fn opt_str(&self, name: &str) -> Result<Option<&str>> {
        self.present(name)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| EngineError::Config(format!("{name} is {v}, expected a string")))
            })
            .transpose()
    }

    /// Fields that would change the model's math in ways the engine does not implement.
    fn reject_unsupported(&self, family: Family) -> Result<()> {
        let unsupported = |what: String| Err(EngineError::Unsupported(what));
        if let Some(act) = self.opt_str("hidden_act")?
            && act != "silu"
        {
            return unsupported(format!("hidden_act {act}; only silu is implemented"));
        }
        if let Some(scaling) = self.present("rope_scaling") {
            return unsupported(format!(
                "rope_scaling {scaling}; only default RoPE is implemented"
            ));
        }
        if let Some(params) = self.present("rope_parameters") {
            let rope_type = params.get("rope_type").and_then(Value::as_str);
            if !matches!(rope_type, None | Some("default")) {
                return unsupported(format!(
                    "rope_parameters.rope_type {}; only default RoPE is implemented",
                    rope_type.unwrap_or_default()
                ));
            }
        }
        if self.opt_bool("use_sliding_window")? == Some(true) {
            return unsupported(
                "use_sliding_window true; sliding-window attention is not implemented".into(),
            );
        }
        if family == Family::Mixtral
            && let Some(window) = self.present("sliding_window")
        {
            return unsupported(format!(
                "sliding_window {window}; sliding-window attention is not implemented"
            ));
        }
        if let Some(Value::Array(types)) = self.present("layer_types")
            && let Some(other) = types.iter().find(|t| t.as_str() != Some("full_attention"))
        {
            return unsupported(format!(
                "layer_types entry {other}; only full_attention is implemented"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
