//! Harness for end-to-end tests: locating the workspace's built binaries and fixtures.

use std::path::PathBuf;

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
