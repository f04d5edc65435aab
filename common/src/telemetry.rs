//! Logging setup shared by every binary.

use std::io::IsTerminal;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), so stdout stays for ready lines
/// and command output; colors only on a terminal.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
