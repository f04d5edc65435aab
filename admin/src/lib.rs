//! `tandemctl`: one verb per module under `commands/`, arguments under `args`.

use std::process::ExitCode;

pub mod args;
pub mod commands;

pub use commands::CommandError;

/// Runs the parsed command line.
pub fn run(cli: args::Cli) -> Result<ExitCode, CommandError> {
    match cli.command {
        args::Command::Generate(generate) => commands::generate::run(&generate),
        args::Command::Up(up) => commands::up::run(&up),
    }
}
