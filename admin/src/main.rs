use std::process::ExitCode;

use clap::Parser;
use tandem_admin::args::Cli;

/// Exit code for bad input (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match tandem_admin::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
