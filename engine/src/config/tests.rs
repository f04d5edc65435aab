use serde_json::{Value, json};

use super::*;

fn qwen3() -> Value {
    json!({
        "model_type": "qwen3_moe",
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_experts": 8, "num_experts_per_tok": 2, "rope_theta": 5000.0, "torch_dtype": "bfloat16"
    })
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().map(|o| o.remove(key));
    base
}

fn error(value: &Value) -> String {
    ModelConfig::from_json(value)
        .expect_err("config must be rejected")
        .to_string()
}

#[test]
fn old_and_new_spellings_give_the_same_config() {
    let old = ModelConfig::from_json(&qwen3()).expect("4.x spelling");
    let new = without(
        without(without(qwen3(), "rope_theta"), "num_experts"),
        "torch_dtype",
    );
    let new = with(
        new,
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 5000.0}),
    );
    let new = with(new, "num_local_experts", json!(8));
    let new = with(new, "dtype", json!("bfloat16"));
    assert_eq!(ModelConfig::from_json(&new).expect("5.x spelling"), old);
    assert_eq!(old.rope_theta, 5000.0);
    assert_eq!(old.dtype, WeightDtype::Bf16);
    assert_eq!(old.moe.num_experts, 8);
}

#[test]
fn head_dim_is_derived_when_absent_and_explicit_when_given() {
    assert_eq!(
        ModelConfig::from_json(&qwen3()).expect("derived").head_dim,
        16
    );
    let explicit = with(qwen3(), "head_dim", json!(24));
    assert_eq!(
        ModelConfig::from_json(&explicit)
            .expect("explicit")
            .head_dim,
        24
    );
}

#[test]
fn sparse_layers_follow_mlp_only_layers_and_decoder_sparse_step() {
    let c = ModelConfig::from_json(&with(qwen3(), "mlp_only_layers", json!([1]))).expect("config");
    assert_eq!(c.sparse_layers, vec![true, false, true, true]);
    let c =
        ModelConfig::from_json(&with(qwen3(), "decoder_sparse_step", json!(2))).expect("config");
    assert_eq!(c.sparse_layers, vec![false, true, false, true]);
}

#[test]
fn family_defaults_for_bias_norm_and_shared_expert() {
    let qwen2 = with(
        with(qwen3(), "model_type", json!("qwen2_moe")),
        "shared_expert_intermediate_size",
        json!(48),
    );
    let c = ModelConfig::from_json(&qwen2).expect("qwen2");
    assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
    assert_eq!(c.moe.shared_expert_intermediate_size, Some(48));
    let mixtral = with(
        without(qwen3(), "num_experts"),
        "model_type",
        json!("mixtral"),
    );
    let mixtral = with(mixtral, "num_local_experts", json!(4));
    let c = ModelConfig::from_json(&mixtral).expect("mixtral");
    assert!(c.moe.norm_topk_prob, "mixtral always renormalizes");
    assert_eq!(
        c.moe.expert_intermediate_size, 96,
        "mixtral experts use intermediate_size"
    );
    let c = ModelConfig::from_json(&with(qwen3(), "attention_bias", json!(true))).expect("qwen3");
    assert!(c.qkv_bias && c.o_bias && c.qk_norm);
}

#[test]
fn eos_token_id_accepts_one_id_or_a_list() {
    let one = ModelConfig::from_json(&with(qwen3(), "eos_token_id", json!(7))).expect("one");
    assert_eq!(one.eos_token_ids, vec![7]);
    let many = ModelConfig::from_json(&with(qwen3(), "eos_token_id", json!([7, 9]))).expect("many");
    assert_eq!(many.eos_token_ids, vec![7, 9]);
}

#[test]
fn unsupported_architecture_is_named() {
    let e = error(&with(qwen3(), "model_type", json!("llama")));
    assert!(e.contains("llama") && e.contains("qwen3_moe"), "{e}");
}

#[test]
fn unsupported_fields_are_named() {
    let cases = [
        ("hidden_act", json!("gelu"), "hidden_act gelu"),
        ("rope_scaling", json!({"type": "yarn"}), "rope_scaling"),
        ("use_sliding_window", json!(true), "use_sliding_window"),
        ("dtype", json!("float8"), "dtype float8"),
    ];
    for (key, value, expected) in cases {
        let e = error(&with(qwen3(), key, value));
        assert!(e.contains(expected), "{key}: {e}");
    }
    let e = error(&with(
        qwen3(),
        "rope_parameters",
        json!({"rope_type": "yarn", "rope_theta": 1.0}),
    ));
    assert!(e.contains("rope_type yarn"), "{e}");
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let e = error(&without(qwen3(), "hidden_size"));
    assert!(e.contains("hidden_size"), "{e}");
    let e = error(&without(qwen3(), "num_experts"));
    assert!(e.contains("num_experts or num_local_experts"), "{e}");
    let e = error(&with(qwen3(), "num_hidden_layers", json!("four")));
    assert!(e.contains("num_hidden_layers") && e.contains("four"), "{e}");
    let e = error(&with(qwen3(), "num_experts_per_tok", json!(9)));
    assert!(e.contains("num_experts_per_tok 9"), "{e}");
    let e = error(&with(qwen3(), "num_key_value_heads", json!(3)));
    assert!(e.contains("num_key_value_heads 3"), "{e}");
}
