//! Request limits: one name for each on the command line, in the environment and in Helm.

use std::time::Duration;

use clap::Args;

/// `--max-prompt-tokens` unless given (GPU workers take prompts this long in one pass).
pub const DEFAULT_MAX_PROMPT_TOKENS: u32 = 8192;

/// Every limit a request is checked against. Flags `--max-prompt-tokens` etc., environment
/// `TANDEM_MAX_PROMPT_TOKENS` etc., Helm `config.router.max-prompt-tokens` etc.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct Limits {
    /// Most prompt tokens a request may have.
    #[arg(long, env = "TANDEM_MAX_PROMPT_TOKENS", default_value_t = DEFAULT_MAX_PROMPT_TOKENS)]
    pub max_prompt_tokens: u32,
    /// Most tokens a request may ask to generate.
    #[arg(long, env = "TANDEM_MAX_NEW_TOKENS", default_value_t = 4096)]
    pub max_new_tokens: u32,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "TANDEM_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Requests served at once; more wait in the queue.
    #[arg(long, env = "TANDEM_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Requests that may wait for a serving slot; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_QUEUE_DEPTH", default_value_t = 1024)]
    pub queue_depth: usize,
    /// Longest a request may take from arrival to its last token, in seconds.
    #[arg(long, env = "TANDEM_REQUEST_TIMEOUT_SECONDS", default_value_t = 300.0)]
    pub request_timeout_seconds: f64,
}

impl Limits {
    /// Every limit at its flag's default (or its `TANDEM_*` variable, where set).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            limits: Limits,
        }
        <Only as clap::Parser>::parse_from(["limits"]).limits
    }

    /// Checks the limits themselves, after parsing.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--max-prompt-tokens", self.max_prompt_tokens as usize),
            ("--max-new-tokens", self.max_new_tokens as usize),
            ("--max-message-bytes", self.max_message_bytes),
            ("--max-concurrent-requests", self.max_concurrent_requests),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be >= 1, got 0"));
        }
        if !(self.request_timeout_seconds.is_finite() && self.request_timeout_seconds > 0.0) {
            return Err(format!(
                "--request-timeout-seconds must be > 0, got {}",
                self.request_timeout_seconds
            ));
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: Limits,
    }

    #[test]
    fn limits_parse_and_zero_is_refused_naming_the_flag() {
        let cli = Cli::try_parse_from(["x", "--max-prompt-tokens", "7", "--queue-depth", "0"])
            .expect("parses");
        assert_eq!(cli.limits.max_prompt_tokens, 7);
        assert_eq!(
            cli.limits.queue_depth, 0,
            "a queue depth of 0 means no waiting"
        );
        assert!(cli.limits.validate().is_ok());
        let cli = Cli::try_parse_from(["x", "--max-new-tokens", "0"]).expect("parses");
        assert_eq!(
            cli.limits.validate().unwrap_err(),
            "--max-new-tokens must be >= 1, got 0"
        );
        let cli = Cli::try_parse_from(["x", "--request-timeout-seconds=-1"]).expect("parses");
        assert!(cli.limits.validate().unwrap_err().contains("-1"));
    }
}
