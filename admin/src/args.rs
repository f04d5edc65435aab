//! `tandemctl`'s command line.

use clap::{Parser, Subcommand};
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
    /// Run one prompt through a model in a single process (no cluster) and print the result.
    ///
    /// Example: tandemctl generate --prompt "Hello" --max-tokens 16 --output json
    Generate(GenerateArgs),
}
