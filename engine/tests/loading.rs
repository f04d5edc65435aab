//! Checkpoints that are wrong in one way each fail at load with a message naming the problem.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tandem_engine::{CpuBackend, Model};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A private copy of a fixture that a test may break.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("tandem-loading-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).expect("temp dir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    dst
}

fn load_error(dir: &Path) -> String {
    match Model::load(dir, CpuBackend, &mut |_| {}) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut value);
    std::fs::write(path, value.to_string()).expect("write");
}

#[test]
fn load_reports_progress_for_every_tensor() {
    let mut last = None;
    Model::load(&fixture("mixtral-f32-sharded"), CpuBackend, &mut |p| {
        last = Some(p)
    })
    .expect("loads");
    let last = last.expect("progress reported");
    assert_eq!(last.tensors_loaded, last.tensors_total);
}

#[test]
fn missing_shard_tensor_is_named() {
    let dir = copy_fixture("mixtral-f32-sharded", "missing");
    edit_json(&dir.join("model.safetensors.index.json"), |v| {
        v["weight_map"]["model.layers.1.self_attn.q_proj.weight"] =
            "no-such-shard.safetensors".into();
    });
    let e = load_error(&dir);
    assert!(e.contains("no-such-shard.safetensors"), "{e}");
}

#[test]
fn shape_mismatch_is_named_with_both_shapes() {
    let dir = copy_fixture("qwen3-moe-f32", "shape");
    edit_json(&dir.join("config.json"), |v| {
        v["moe_intermediate_size"] = 40.into()
    });
    let e = load_error(&dir);
    assert!(
        e.contains("gate_proj.weight") && e.contains("[32, 64]") && e.contains("[40, 64]"),
        "{e}"
    );
}

#[test]
fn tensors_the_engine_would_ignore_are_refused() {
    let dir = copy_fixture("qwen2-moe-f32", "leftover");
    // Without its shared expert the config no longer explains every tensor in the file.
    edit_json(&dir.join("config.json"), |v| {
        v["shared_expert_intermediate_size"] = 0.into()
    });
    let e = load_error(&dir);
    assert!(
        e.contains("does not use") && e.contains("shared_expert"),
        "{e}"
    );
}

#[test]
fn missing_weights_file_is_named() {
    let dir = copy_fixture("qwen3-moe-f32", "noweights");
    std::fs::remove_file(dir.join("model.safetensors")).expect("remove");
    let e = load_error(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}
