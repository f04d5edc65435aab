//! `tandemctl`'s command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tandem_common::generate::GenerateArgs;

/// Tandem: disaggregated prefill/decode serving for Mixture-of-Experts models.
#[derive(Debug, Parser)]
#[command(name = "tandemctl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one prompt and print the result: in this process, or through a cluster's router
    /// with --router.
    ///
    /// Example: tandemctl generate --prompt "Hello" --max-tokens 16 --output json
    Generate(GenerateCommand),
    /// Start a local cluster (router, prefill and decode workers) on this machine.
    ///
    /// Prints the router's gRPC address as host:port, then a line containing `ready` once it
    /// serves; stops every process on Ctrl-C or SIGTERM.
    Up(UpArgs),
}

#[derive(Debug, Args)]
pub struct GenerateCommand {
    #[command(flatten)]
    pub args: GenerateArgs,
    /// Send the prompt to this router (host:port) instead of running the model here; the
    /// cluster's model is used, so --model and --device do not apply.
    #[arg(long, env = "TANDEM_ROUTER", value_name = "HOST:PORT")]
    pub router: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct UpArgs {
    /// Hugging Face checkpoint folder every worker loads; without it, the demo model.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Prefill workers to start (0: decode workers prefill their own prompts).
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode workers to start (at least 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub decode: u64,
    /// The router's gRPC address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Seconds each process may take to start before `up` gives up.
    #[arg(long, default_value_t = 300.0)]
    pub startup_timeout_seconds: f64,
}
