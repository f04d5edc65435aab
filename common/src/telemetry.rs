//! Logging setup shared by every binary.

use std::io::IsTerminal;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), so stdout stays for ready lines
/// and command output: text with colors only on a terminal, or one JSON object per line with
/// `TANDEM_LOG_FORMAT=json` (for log collectors).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("TANDEM_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().with_current_span(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
