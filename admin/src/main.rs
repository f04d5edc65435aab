use std::process::ExitCode;

use clap::Parser;
use tandem_admin::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match tandem_admin::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
