//! Harness for end-to-end tests: the workspace's built binaries, fixtures, and clusters of
//! real processes on loopback.

mod cluster;
mod etcd;
pub mod pki;
pub mod prometheus;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use cluster::{Cluster, ClusterBuilder, Process, TEST_LEASE_TTL_SECONDS};
pub use etcd::Etcd;

/// The folder holding the workspace's binaries for the profile this test was built with
/// (the test executable lives in its `deps/` subfolder).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary such as `tandemctl`.
pub fn binary(name: &str) -> PathBuf {
    binary_dir().join(name)
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Whether `binary` (from Debian's `package`) is installed. Without it a test is skipped with
/// a printed reason, unless `CI=true`, where that fails the run.
pub fn installed(binary: &str, package: &str) -> bool {
    if Command::new(binary).arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{binary} is not installed, and CI=true requires it (apt-get install {package})"
    );
    println!("skipped: no {binary} binary (apt-get install {package})");
    false
}

/// `target/test-logs/<test>`, emptied.
pub fn log_dir(test: &str) -> PathBuf {
    let dir = binary_dir()
        .parent()
        .map(|target| target.join("test-logs").join(test))
        .unwrap_or_else(|| std::env::temp_dir().join("tandem-test-logs").join(test));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Runs `tandemctl args`, which must succeed, and returns its stdout.
pub fn tandemctl_ok(args: &[&str]) -> String {
    let out = Command::new(binary("tandemctl"))
        .args(args)
        .output()
        .expect("tandemctl runs");
    assert!(
        out.status.success(),
        "tandemctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `tandemctl args`, which must succeed, and parses its stdout as JSON.
pub fn tandemctl_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&tandemctl_ok(args)).expect("json output")
}

/// `tandemctl generate --output json` in one process on the CPU with `model` and `args`: the
/// reference the cluster must reproduce.
pub fn single_process_json(model: &Path, args: &[&str]) -> serde_json::Value {
    let model = model.to_string_lossy();
    let mut all = vec![
        "generate", "--output", "json", "--device", "cpu", "--model", &model,
    ];
    all.extend_from_slice(args);
    tandemctl_json(&all)
}

/// Greedy tokens of a single-process run for `prompt` (see [`single_process_json`]);
/// `flags` are more `generate` flags.
pub fn single_process_tokens(
    model: &Path,
    prompt: &[u32],
    max_tokens: u32,
    flags: &[&str],
) -> Vec<u32> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let (ids, max_tokens) = (ids.join(","), max_tokens.to_string());
    let mut args = vec!["--prompt-ids", &ids, "--max-tokens", &max_tokens];
    args.extend_from_slice(flags);
    single_process_json(model, &args)["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}
