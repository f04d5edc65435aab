//! What several engine test binaries share: the fixture checkpoints.

use std::path::{Path, PathBuf};

/// Every committed fixture: each family, f32 and bf16, tied and sharded variants.
pub(crate) const FIXTURES: &[&str] = &[
    "qwen3-moe-f32",
    "qwen3-moe-tied-bf16",
    "mixtral-f32-sharded",
    "mixtral-bf16",
    "qwen2-moe-f32",
    "qwen2-moe-bf16",
];

pub(crate) fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}
