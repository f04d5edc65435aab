//! The built-in demo model: a small Qwen3-MoE checkpoint with seeded random weights and the
//! project's own byte-level BPE tokenizer, written to a cache folder on first use so a fresh
//! machine can serve something with no download. Its text is not meaningful.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use half::bf16;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};
use serde_json::json;

use crate::config::{Family, ModelConfig};
use crate::error::{EngineError, Result};
use crate::rng::Rng;

/// Folder name of the demo model in the cache; bump the version when its contents change.
pub const DEMO_MODEL_NAME: &str = "tandem-demo-qwen3-moe-v1";
const DEMO_SEED: u64 = 0x7a4d_3e11;
const TOKENIZER_JSON: &[u8] = include_bytes!("../assets/demo-tokenizer.json");
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
/// Scale of the LM head relative to a unit-variance projection: peaky logits give the demo
/// some structure to its (meaningless) text.
const LM_HEAD_GAIN: f32 = 8.0;
const ROUTER_GAIN: f32 = 4.0;
const BF16_BYTES: usize = 2;
/// Random draws taken from the generator before they are turned into values in parallel.
const DRAWS_PER_CHUNK: usize = 1 << 22;

/// Where the demo model lives: `$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else
/// `~/.cache/tandem`, followed by [`DEMO_MODEL_NAME`].
pub fn demo_model_dir() -> PathBuf {
    let base = std::env::var_os("TANDEM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tandem")))
        .or_else(|| {
            std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache").join("tandem"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("tandem"));
    base.join(DEMO_MODEL_NAME)
}

/// Returns the demo model's folder, writing it first if it is not there yet.
pub fn ensure_demo_model() -> Result<PathBuf> {
    let dir = demo_model_dir();
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
    // Written aside and renamed, so a crash or a concurrent writer never leaves half a model.
    let staging = parent.join(format!("{DEMO_MODEL_NAME}.tmp-{}", std::process::id()));
    write_demo_model(&staging)?;
    match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(e) => Err(EngineError::io(&dir, e)),
    }
}

/// The demo model's `config.json`: a small all-sparse Qwen3-MoE shape, which tests also vary
/// (another head_dim, fewer layers) for random checkpoints of their own.
pub fn demo_config() -> serde_json::Value {
    json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": true,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "dtype": "bfloat16",
        "eos_token_id": 2
    })
}

/// Writes the demo checkpoint (config, bf16 safetensors, tokenizer) into `dir`.
pub fn write_demo_model(dir: &Path) -> Result<()> {
    write_random_checkpoint(dir, &demo_config(), DEMO_SEED)?;
    write_file(&dir.join("tokenizer.json"), TOKENIZER_JSON)?;
    let tokenizer_config = json!({
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096
    });
    write_file(
        &dir.join("tokenizer_config.json"),
        tokenizer_config.to_string().as_bytes(),
    )
}

/// Writes `config.json` and a bf16 `model.safetensors` of seeded random weights for a
/// Qwen3-MoE `config_json` (no tokenizer): the demo model and the benches' synthetic models.
pub fn write_random_checkpoint(
    dir: &Path,
    config_json: &serde_json::Value,
    seed: u64,
) -> Result<()> {
    let config = ModelConfig::from_json(config_json)?;
    if config.family != Family::Qwen3Moe || !config.sparse_layers.iter().all(|s| *s) {
        return Err(EngineError::Unsupported(
            "random checkpoints are written for all-sparse qwen3_moe configs only".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    write_file(&dir.join("config.json"), config_json.to_string().as_bytes())?;
    let mut rng = Rng::seeded(seed);
    let tensors: Vec<(String, Bf16Tensor)> = demo_tensor_shapes(&config)
        .into_iter()
        .map(|(name, shape, init)| {
            let t = Bf16Tensor::new(&mut rng, shape, init);
            (name, t)
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::tensor::serialize_to_file(tensors, None, &path).map_err(|e| {
        EngineError::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        }
    })
}

#[derive(Debug, Clone, Copy)]
enum Init {
    Ones,
    /// Uniform with standard deviation `gain / sqrt(fan_in)`.
    Scaled(f32),
}

fn demo_tensor_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (h, e, i) = (
        c.hidden_size,
        c.moe.num_experts,
        c.moe.expert_intermediate_size,
    );
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_owned(),
            vec![c.vocab_size, h],
            Init::Scaled((h as f32).sqrt()),
        ),
        ("model.norm.weight".to_owned(), vec![h], Init::Ones),
        (
            "lm_head.weight".to_owned(),
            vec![c.vocab_size, h],
            Init::Scaled(LM_HEAD_GAIN),
        ),
    ];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let mut push = |name: String, shape: Vec<usize>, init| out.push((name, shape, init));
        push(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        );
        push(
            format!("{p}.self_attn.q_proj.weight"),
            vec![c.q_width(), h],
            Init::Scaled(1.0),
        );
        push(
            format!("{p}.self_attn.k_proj.weight"),
            vec![c.kv_width(), h],
            Init::Scaled(1.0),
        );
        push(
            format!("{p}.self_attn.v_proj.weight"),
            vec![c.kv_width(), h],
            Init::Scaled(1.0),
        );
        push(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, c.q_width()],
            Init::Scaled(1.0),
        );
        push(
            format!("{p}.self_attn.q_norm.weight"),
            vec![c.head_dim],
            Init::Ones,
        );
        push(
            format!("{p}.self_attn.k_norm.weight"),
            vec![c.head_dim],
            Init::Ones,
        );
        push(
            format!("{p}.mlp.gate.weight"),
            vec![e, h],
            Init::Scaled(ROUTER_GAIN),
        );
        for x in 0..e {
            push(
                format!("{p}.mlp.experts.{x}.gate_proj.weight"),
                vec![i, h],
                Init::Scaled(1.0),
            );
            push(
                format!("{p}.mlp.experts.{x}.up_proj.weight"),
                vec![i, h],
                Init::Scaled(1.0),
            );
            push(
                format!("{p}.mlp.experts.{x}.down_proj.weight"),
                vec![h, i],
                Init::Scaled(1.0),
            );
        }
    }
    out
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| EngineError::io(path, e))
}

/// A bf16 tensor ready for safetensors serialization.
struct Bf16Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Bf16Tensor {
    /// The values are drawn from `rng` in order, a chunk at a time, and turned into bf16 on
    /// every core: the benches' checkpoints hold billions of values.
    fn new(rng: &mut Rng, shape: Vec<usize>, init: Init) -> Self {
        let count: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let bytes = match init {
            // Norm weights: small, one value repeated.
            Init::Ones => bf16::ONE.to_le_bytes().repeat(count),
            Init::Scaled(gain) => {
                // Uniform on [-a, a] has standard deviation a / sqrt(3).
                let a = gain / fan_in.sqrt() * 3f32.sqrt();
                let mut bytes = vec![0u8; count * BF16_BYTES];
                let mut draws = Vec::with_capacity(DRAWS_PER_CHUNK.min(count));
                for chunk in bytes.chunks_mut(DRAWS_PER_CHUNK * BF16_BYTES) {
                    draws.clear();
                    draws.extend((0..chunk.len() / BF16_BYTES).map(|_| rng.next_u64()));
                    chunk
                        .par_chunks_mut(BF16_BYTES)
                        .zip(draws.par_iter())
                        .for_each(|(out, &draw)| {
                            let value = (Rng::unit_f64(draw) as f32 * 2.0 - 1.0) * a;
                            out.copy_from_slice(&bf16::from_f32(value).to_le_bytes());
                        });
                }
                bytes
            }
        };
        Self { shape, bytes }
    }
}

impl View for Bf16Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_values_follow_the_generator_in_order_across_chunks() {
        let (rows, cols) = (DRAWS_PER_CHUNK / 1000 + 1, 1000);
        let tensor = Bf16Tensor::new(&mut Rng::seeded(3), vec![rows, cols], Init::Scaled(2.0));
        let mut rng = Rng::seeded(3);
        let a = 2.0 / (cols as f32).sqrt() * 3f32.sqrt();
        let expected: Vec<u8> = (0..rows * cols)
            .flat_map(|_| {
                let value = (rng.next_f64() as f32 * 2.0 - 1.0) * a;
                bf16::from_f32(value).to_le_bytes()
            })
            .collect();
        assert!(tensor.bytes.len() > DRAWS_PER_CHUNK * BF16_BYTES);
        assert!(
            tensor.bytes == expected,
            "values differ from the sequential stream"
        );
    }
}
