//! `tandem-prefill-worker`: a Tandem worker that starts in the prefill role. It runs prompts
//! and pushes their KV to decode workers layer by layer; `tandemctl move` can switch it to
//! decode without reloading the weights.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem_proto::internal::v1::Role;
use tandem_worker::WorkerArgs;

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
    /// `ready grpc=HOST:PORT kv=HOST:PORT` on stdout once it serves (the KV listener is used
    /// if the worker is moved to decode).
    Serve(Box<WorkerArgs>),
}

fn main() -> ExitCode {
    match Config::parse().command {
        Command::Serve(args) => tandem_worker::serve_main(*args, Role::Prefill),
    }
}
