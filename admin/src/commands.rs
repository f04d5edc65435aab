//! One module per verb.

use std::path::PathBuf;

pub mod generate;

/// Failures of a `tandemctl` command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot find the {binary} binary next to tandemctl ({searched}) or on PATH")]
    BinaryNotFound {
        binary: &'static str,
        searched: String,
    },
    #[error("starting {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
