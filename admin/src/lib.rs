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
        args::Command::Get(a) => commands::admin::get(&a),
        args::Command::Describe(a) => commands::admin::describe(&a),
        args::Command::Cordon(a) => commands::admin::cordon(&a, true),
        args::Command::Uncordon(a) => commands::admin::cordon(&a, false),
        args::Command::Drain(a) => commands::admin::drain(&a),
        args::Command::Move(a) => commands::admin::move_worker(&a),
        args::Command::Rebalance(a) => commands::admin::rebalance(&a),
        args::Command::Top(a) => commands::admin::top(&a),
        args::Command::Bench(a) => commands::bench::run(&a).map(|()| ExitCode::SUCCESS),
        args::Command::Plan(a) => commands::plan::run(&a).map(|()| ExitCode::SUCCESS),
        args::Command::Calibrate(a) => commands::plan::calibrate(&a).map(|()| ExitCode::SUCCESS),
        args::Command::Route(args::RouteCommand::Explain(a)) => commands::admin::explain_route(&a),
        args::Command::Completions { shell } => {
            let mut command = <args::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "tandemctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}
