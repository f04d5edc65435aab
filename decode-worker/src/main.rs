use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem_common::generate::GenerateArgs;
use tandem_proto::internal::v1::Role;
use tandem_worker::WorkerArgs;

/// Exit code for bad command-line input (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Tandem decode worker.
#[derive(Parser)]
#[command(name = "tandem-decode-worker", version, about)]
struct Config {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the decode role: take KV from prefill workers and stream tokens to routers.
    /// Prints `ready grpc=HOST:PORT kv=HOST:PORT` on stdout once it serves. `tandemctl move`
    /// can switch it to prefill without reloading the weights.
    Serve(Box<WorkerArgs>),
    /// Run one prompt through the model in this process and print the result.
    Generate(GenerateArgs),
}

fn main() -> ExitCode {
    let config = Config::parse();
    match config.command {
        Command::Serve(args) => tandem_worker::serve_main(*args, Role::Decode),
        Command::Generate(args) => match tandem_decode_worker::generate::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                let code = if e.is_usage() { EXIT_USAGE } else { 1 };
                ExitCode::from(code)
            }
        },
    }
}
