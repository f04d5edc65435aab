use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem_prefill_worker::serve::ServeConfig;

/// Tandem prefill worker.
#[derive(Parser)]
#[command(name = "tandem-prefill-worker", version, about)]
struct Config {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the prefill role: run prompts and push their KV to decode workers. Prints
    /// `ready grpc=HOST:PORT` on stdout once it serves.
    Serve(ServeConfig),
}

fn main() -> ExitCode {
    match Config::parse().command {
        Command::Serve(config) => {
            tandem_worker::main_with(tandem_prefill_worker::serve::run(config))
        }
    }
}
