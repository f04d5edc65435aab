//! `tandemctl generate`: without --router the model runs in the worker binary, which links
//! the engine, so that tandemctl itself never links the engine or a GPU library.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::args::GenerateCommand;

use super::{CommandError, remote_generate};

const WORKER_BINARY: &str = "tandem-decode-worker";

/// Streams from the router, or runs `tandem-decode-worker generate` with the same arguments,
/// passing its output through.
pub fn run(command: &GenerateCommand) -> Result<ExitCode, CommandError> {
    let args = &command.args;
    if let Some(router) = &command.router {
        if args.model.is_some() {
            return Err(CommandError::Usage(
                "--model names a folder for runs in this process; with --router the cluster's model is used".into(),
            ));
        }
        remote_generate::run(router, command.api_key.as_deref(), &command.tls, args)?;
        return Ok(ExitCode::SUCCESS);
    }
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
