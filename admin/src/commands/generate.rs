//! `tandemctl generate`: the model runs in the worker binary, which links the engine, so that
//! tandemctl itself never links the engine or a GPU library.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use tandem_common::generate::GenerateArgs;

use super::CommandError;

const WORKER_BINARY: &str = "tandem-decode-worker";

/// Runs `tandem-decode-worker generate` with the same arguments, passing its output through.
pub fn run(args: &GenerateArgs) -> Result<ExitCode, CommandError> {
    let worker = sibling_binary(WORKER_BINARY)?;
    let status = Command::new(&worker)
        .arg("generate")
        .args(args.to_args())
        .status()
        .map_err(|source| CommandError::Spawn {
            path: worker.clone(),
            source,
        })?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Finds `name` in tandemctl's own folder (how releases and `cargo build` lay binaries out),
/// then on PATH.
pub(crate) fn sibling_binary(name: &'static str) -> Result<PathBuf, CommandError> {
    let own_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned));
    let mut searched = Vec::new();
    if let Some(dir) = own_dir {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(dir.display().to_string());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    searched.push("PATH".into());
    Err(CommandError::BinaryNotFound {
        binary: name,
        searched: searched.join(", "),
    })
}
