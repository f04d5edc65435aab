//! `tandemctl generate` as a user runs it: the real binaries, real fixture checkpoints, and
//! the JSON contract other checks rely on.

use std::path::Path;
use std::process::{Command, Output};

use safetensors::SafeTensors;
use serde_json::Value;
use tandem_tests::{binary, fixture};

fn tandemctl(args: &[&str], cache: &Path) -> Output {
    Command::new(binary("tandemctl"))
        .args(args)
        .env("TANDEM_CACHE_DIR", cache)
        .env_remove("TANDEM_MODEL")
        .env_remove("TANDEM_DEVICE")
        .output()
        .expect("tandemctl runs (built by `make test` before the tests)")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}

/// Prompt and greedy continuation number `i` of a fixture's reference.
fn reference(name: &str, i: usize) -> (Vec<u64>, Vec<u64>) {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("reference parses");
    let read = |key: String| -> Vec<u64> {
        st.tensor(&key)
            .expect("tensor")
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u64)
            .collect()
    };
    (
        read(format!("prompt{i}.ids")),
        read(format!("prompt{i}.greedy")),
    )
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn generate_json_matches_transformers_greedy_on_every_family() {
    let cache = temp_dir("families");
    for name in ["qwen3-moe-f32", "mixtral-f32-sharded", "qwen2-moe-bf16"] {
        let (prompt, greedy) = reference(name, 2);
        let prompt_arg = prompt
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let model = fixture(name);
        let max = greedy.len().to_string();
        let out = json_of(&tandemctl(
            &[
                "generate",
                "--model",
                model.to_str().expect("utf-8 path"),
                "--prompt-ids",
                &prompt_arg,
                "--max-tokens",
                &max,
                "--temperature",
                "0",
                "--device",
                "cpu",
                "--ignore-eos",
                "--output",
                "json",
            ],
            &cache,
        ));
        assert_eq!(ids(&out["token_ids"]), greedy, "{name}");
        assert_eq!(
            out["logprobs"].as_array().expect("logprobs").len(),
            greedy.len()
        );
        assert!(
            out["logprobs"]
                .as_array()
                .expect("logprobs")
                .iter()
                .all(|l| l.as_f64().is_some_and(|l| l <= 0.0))
        );
        assert_eq!(out["finish_reason"], "length");
        assert_eq!(
            out["usage"]["completion_tokens"].as_u64(),
            Some(greedy.len() as u64)
        );
        assert!(out["text"].is_string());
    }
}

#[test]
fn demo_model_is_written_once_and_answers_deterministically() {
    let cache = temp_dir("demo");
    let args = [
        "generate",
        "--prompt",
        "Hello, Tandem",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--output",
        "json",
    ];
    let first = json_of(&tandemctl(&args, &cache));
    assert!(cache.join("tandem-demo-qwen3-moe-v1/config.json").is_file());
    let second = json_of(&tandemctl(&args, &cache));
    assert_eq!(first["token_ids"], second["token_ids"]);
    let n = first["token_ids"].as_array().expect("ids").len();
    assert!((1..=12).contains(&n));
    assert!(
        !first["prompt_token_ids"]
            .as_array()
            .expect("prompt ids")
            .is_empty()
    );
}

#[test]
fn seeded_sampling_repeats_and_top_logprobs_are_reported() {
    let cache = temp_dir("seeded");
    let model = fixture("qwen3-moe-f32");
    let args = |seed: &str| {
        vec![
            "generate".to_owned(),
            "--model".into(),
            model.display().to_string(),
            "--prompt".into(),
            "The fox".into(),
            "--max-tokens".into(),
            "16".into(),
            "--temperature".into(),
            "1.0".into(),
            "--seed".into(),
            seed.into(),
            "--top-logprobs".into(),
            "3".into(),
            "--ignore-eos".into(),
            "--output".into(),
            "json".into(),
        ]
    };
    let run = |seed: &str| {
        let a = args(seed);
        json_of(&tandemctl(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &cache,
        ))
    };
    let (a, b, c) = (run("7"), run("7"), run("8"));
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_ne!(a["token_ids"], c["token_ids"]);
    let top = a["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(top.len(), 16);
    assert!(
        top.iter()
            .all(|t| t.as_array().is_some_and(|alts| alts.len() == 3))
    );
}

#[test]
fn bad_input_exits_with_a_message_naming_the_problem() {
    let cache = temp_dir("bad");
    let model = fixture("qwen3-moe-f32");
    let model = model.to_str().expect("utf-8 path");
    let cases: [(&[&str], i32, &str); 5] = [
        (
            &["generate", "--model", model, "--prompt-ids", "5,4096"],
            64,
            "token id 4096 is outside the vocabulary of 1024",
        ),
        (
            &[
                "generate", "--model", model, "--prompt", "hi", "--top-p", "1.5",
            ],
            64,
            "top_p must be in (0, 1], got 1.5",
        ),
        (
            &[
                "generate",
                "--model",
                "/nonexistent/model",
                "--prompt",
                "hi",
            ],
            1,
            "/nonexistent/model",
        ),
        (
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "hi",
                "--max-tokens",
                "0",
            ],
            64,
            "max_new_tokens must be >= 1, got 0",
        ),
        (
            &[
                "generate", "--model", model, "--prompt", "hi", "--device", "cuda",
            ],
            64,
            "cuda",
        ),
    ];
    for (args, code, message) in cases {
        let out = tandemctl(args, &cache);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
