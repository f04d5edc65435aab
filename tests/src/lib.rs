//! Harness for end-to-end tests: the workspace's built binaries, fixtures, and clusters of
//! real processes on loopback.

mod cluster;
mod etcd;

use std::path::PathBuf;

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
