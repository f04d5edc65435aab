//! A MoE model's shape, read from its Hugging Face `config.json` (Qwen3-MoE, Qwen2-MoE,
//! Mixtral, DeepSeek-V3/R1 with multi-head latent attention): what the cost model needs,
//! parameter bytes by kind, FLOPs and KV bytes per token.

use serde_json::Value;

use crate::SimError;

/// Sizes the cost model uses; bytes are per GPU-resident copy, before any sharding.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub name: String,
    pub layers: usize,
    /// Layers whose MLP is a mixture of experts (the rest are dense).
    pub moe_layers: usize,
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Bytes per parameter of the weights (1 for fp8, 2 for bf16).
    pub weight_bytes: f64,
    /// Parameters of one expert (gate, up, down).
    pub expert_params: f64,
    /// Parameters every token uses in one layer: attention and shared experts (MoE layers)
    /// or the dense MLP (dense layers), averaged over layers.
    pub dense_params_per_layer: f64,
    /// Embedding and output head.
    pub vocab_params: f64,
    /// KV-cache bytes one token holds in one layer (bf16).
    pub kv_bytes_per_token_layer: f64,
    /// Attention FLOPs per (query token, context token) pair in one layer.
    pub attention_flops_per_pair: f64,
}

fn field(config: &Value, names: &[&str]) -> Option<f64> {
    names.iter().find_map(|n| config.get(*n)?.as_f64())
}

fn required(config: &Value, names: &[&str]) -> Result<f64, SimError> {
    field(config, names)
        .ok_or_else(|| SimError::Input(format!("config.json has none of {}", names.join(", "))))
}

impl ModelShape {
    /// Reads `config.json` at `path`.
    pub fn load(path: &str) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Input(format!("reading model config {path}: {e}")))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| SimError::Input(format!("model config {path}: {e}")))?;
        let name = std::path::Path::new(path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_config(&name, &config)
    }

    pub fn from_config(name: &str, config: &Value) -> Result<Self, SimError> {
        let hidden = required(config, &["hidden_size"])?;
        let layers = required(config, &["num_hidden_layers"])? as usize;
        let experts = required(
            config,
            &["n_routed_experts", "num_experts", "num_local_experts"],
        )?;
        let top_k = required(config, &["num_experts_per_tok", "num_experts_per_token"])?;
        let dense_dim = required(config, &["intermediate_size"])?;
        // Mixtral's experts are `intermediate_size` wide.
        let expert_dim = field(config, &["moe_intermediate_size"]).unwrap_or(dense_dim);
        let shared = field(config, &["n_shared_experts"]).unwrap_or(0.0)
            + field(config, &["shared_expert_intermediate_size"]).map_or(0.0, |d| d / expert_dim);
        let dense_layers = field(config, &["first_k_dense_replace"]).unwrap_or(0.0) as usize;
        let heads = required(config, &["num_attention_heads"])?;
        let fp8 = config
            .pointer("/quantization_config/quant_method")
            .and_then(Value::as_str)
            == Some("fp8");
        let (attention_params, kv_values, pair_flops) = if let Some(kv_rank) =
            field(config, &["kv_lora_rank"])
        {
            // Multi-head latent attention: the cache holds the latent and the rope key;
            // decode attends in the latent space (absorbed projections).
            let q_rank = field(config, &["q_lora_rank"]).unwrap_or(0.0);
            let nope = required(config, &["qk_nope_head_dim"])?;
            let rope = required(config, &["qk_rope_head_dim"])?;
            let v = required(config, &["v_head_dim"])?;
            let q = if q_rank > 0.0 {
                hidden * q_rank + q_rank * heads * (nope + rope)
            } else {
                hidden * heads * (nope + rope)
            };
            let params =
                q + hidden * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * hidden;
            (params, kv_rank + rope, 2.0 * heads * (2.0 * kv_rank + rope))
        } else {
            let kv_heads = field(config, &["num_key_value_heads"]).unwrap_or(heads);
            let head_dim = field(config, &["head_dim"]).unwrap_or(hidden / heads);
            let params = 2.0 * hidden * heads * head_dim + 2.0 * hidden * kv_heads * head_dim;
            (params, 2.0 * kv_heads * head_dim, 4.0 * heads * head_dim)
        };
        let expert_params = 3.0 * hidden * expert_dim;
        let moe_layers = layers.saturating_sub(dense_layers);
        let dense_total = attention_params * layers as f64
            + shared * expert_params * moe_layers as f64
            + 3.0 * hidden * dense_dim * dense_layers as f64;
        let vocab = required(config, &["vocab_size"])?;
        Ok(Self {
            name: name.to_owned(),
            layers,
            moe_layers,
            hidden: hidden as usize,
            experts: experts as usize,
            top_k: top_k as usize,
            weight_bytes: if fp8 { 1.0 } else { 2.0 },
            expert_params,
            dense_params_per_layer: dense_total / layers as f64,
            vocab_params: 2.0 * vocab * hidden,
            kv_bytes_per_token_layer: kv_values * 2.0,
            attention_flops_per_pair: pair_flops,
        })
    }

    /// Every parameter.
    pub fn total_params(&self) -> f64 {
        self.dense_params_per_layer * self.layers as f64
            + self.expert_params * (self.experts * self.moe_layers) as f64
            + self.vocab_params
    }

    /// Parameters one token uses.
    pub fn active_params(&self) -> f64 {
        self.dense_params_per_layer * self.layers as f64
            + self.expert_params * (self.top_k * self.moe_layers) as f64
            + self.vocab_params / 2.0
    }

    /// KV-cache bytes of one token over all layers.
    pub fn kv_bytes_per_token(&self) -> f64 {
        self.kv_bytes_per_token_layer * self.layers as f64
    }
}

#[cfg(test)]
mod tests {
    use crate::fixtures::model as shipped;

    #[test]
    fn deepseek_r1_has_its_published_size() {
        let r1 = shipped("deepseek-r1");
        // 671B parameters (the MTP module aside), 37B active per token.
        let total = r1.total_params() / 1e9;
        let active = r1.active_params() / 1e9;
        assert!((650.0..690.0).contains(&total), "{total}B");
        assert!((34.0..40.0).contains(&active), "{active}B active");
        assert_eq!(r1.weight_bytes, 1.0);
        // MLA caches 576 values per token per layer.
        assert_eq!(r1.kv_bytes_per_token_layer, 1152.0);
    }

    #[test]
    fn qwen3_30b_a3b_has_its_published_size() {
        let q = shipped("qwen3-30b-a3b");
        let total = q.total_params() / 1e9;
        let active = q.active_params() / 1e9;
        assert!((29.0..32.0).contains(&total), "{total}B");
        assert!((2.8..3.6).contains(&active), "{active}B active");
    }
}
