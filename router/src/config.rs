//! The router's command line.

use std::net::SocketAddr;

use clap::Parser;

pub use crate::orchestrate::Routing;
use tandem_common::limits::Limits;
use tandem_common::telemetry::TraceArgs;
use tandem_common::tls::TlsArgs;

/// Tandem router: the gRPC front door of a prefill/decode cluster.
#[derive(Debug, Clone, PartialEq, Parser)]
#[command(name = "tandem-router", version, about)]
pub struct Config {
    /// gRPC address to listen on; port 0 picks a free port. Prints `ready grpc=HOST:PORT`
    /// on stdout once it serves.
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address for OpenAI-compatible HTTP (`/v1/completions`, `/v1/chat/completions`,
    /// `/v1/models`); port 0 picks a free port (printed as `http=HOST:PORT` on the ready
    /// line). Off when unset.
    #[arg(long, env = "TANDEM_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Address for Prometheus metrics (`/metrics`) and probes (`/healthz`, `/readyz`: ready
    /// once a decode worker is known), plain HTTP; port 0 picks one (`metrics=HOST:PORT` on the
    /// ready line). Off when unset.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Prefill worker gRPC address (host:port); repeat or comma-separate. None: decode
    /// workers prefill their own prompts.
    #[arg(
        long = "prefill-worker",
        env = "TANDEM_PREFILL_WORKERS",
        value_delimiter = ','
    )]
    pub prefill_workers: Vec<String>,
    /// Decode worker gRPC address (host:port); repeat or comma-separate. At least one.
    #[arg(
        long = "decode-worker",
        env = "TANDEM_DECODE_WORKERS",
        value_delimiter = ',',
        required_unless_present = "etcd"
    )]
    pub decode_workers: Vec<String>,
    /// etcd endpoint (host:port): follow the workers registered there instead of taking them
    /// from the flags.
    #[arg(long, env = "TANDEM_ETCD_ENDPOINT", conflicts_with_all = ["decode_workers", "prefill_workers"])]
    pub etcd: Option<String>,
    /// Cluster name: the etcd key prefix `/tandem/<cluster>/`.
    #[arg(long, env = "TANDEM_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Tokens generated when a request does not say (capped by --max-new-tokens).
    #[arg(long, env = "TANDEM_DEFAULT_MAX_TOKENS", default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Seconds to wait at startup for the workers given by flag to describe their model, or
    /// (with --etcd) for a decode worker to register.
    #[arg(
        long,
        env = "TANDEM_WORKER_STARTUP_TIMEOUT_SECONDS",
        default_value_t = 120.0
    )]
    pub worker_startup_timeout_seconds: f64,
    /// API key clients must present (`authorization: Bearer <key>`) on gRPC and HTTP
    /// inference calls; repeat or comma-separate for several. Without one, anyone who can
    /// reach the router may call it.
    #[arg(
        long = "api-key",
        env = "TANDEM_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Generation requests per second each client may make (by API key, or by address
    /// without keys); over it, RESOURCE_EXHAUSTED (HTTP 429) at once. Off when unset.
    #[arg(long, env = "TANDEM_RATE_LIMIT_PER_CLIENT")]
    pub rate_limit_per_client: Option<f64>,
    /// Requests a client may make at once above its rate (the bucket size).
    #[arg(long, env = "TANDEM_RATE_LIMIT_BURST", default_value_t = 10)]
    pub rate_limit_burst: u32,
    /// Token admin calls must carry (`authorization: Bearer <token>`). Without one, admin
    /// calls are accepted from loopback clients only.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Seconds a worker that failed a call gets no new request (until the registry catches up).
    #[arg(long, env = "TANDEM_WORKER_HOLDBACK_SECONDS", default_value_t = 5.0)]
    pub worker_holdback_seconds: f64,
    /// Attempts per request on different workers while no token has reached the client.
    #[arg(long, env = "TANDEM_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Times one stream may move to another worker pair after its decode worker failed
    /// mid-stream: the prompt and the tokens already sent are prefilled again there and the
    /// stream goes on (0: the request fails instead).
    #[arg(long, env = "TANDEM_MIGRATION_LIMIT", default_value_t = 2)]
    pub migration_limit: u32,
    /// How prefill workers are chosen: kv-aware sends each prompt where the fewest of its
    /// tokens need computing (the workers' prefix caches, from their KV events, and the
    /// prompt tokens already queued there); round-robin takes each in turn.
    #[arg(long, value_enum, env = "TANDEM_ROUTING", default_value_t = Routing::KvAware)]
    pub routing: Routing,
    /// Prompts with fewer tokens than this left to compute on the chosen prefill worker (not
    /// in its prefix cache) are prefilled by the decode worker instead: cheaper than moving
    /// their KV. 0 (the default) always uses a prefill worker when there is one.
    #[arg(long, env = "TANDEM_LOCAL_PREFILL_BELOW", default_value_t = 0)]
    pub local_prefill_below: usize,
    /// Seconds a drain waits for a worker's requests when the call gives no timeout.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_SECONDS", default_value_t = 300.0)]
    pub drain_timeout_seconds: f64,
    /// Seconds in-flight streams get to finish after SIGTERM.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_SECONDS", default_value_t = 30.0)]
    pub shutdown_grace_seconds: f64,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub traces: TraceArgs,
    /// With TLS on, let clients without a certificate in on the router's gRPC and HTTP
    /// listeners (API keys tell them apart); a certificate one presents must still come from
    /// --tls-ca. Workers always require one.
    #[arg(long, env = "TANDEM_TLS_ANONYMOUS_CLIENTS")]
    pub tls_anonymous_clients: bool,
}

impl Config {
    /// Checks values clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.limits.validate()?;
        if self.default_max_tokens == 0 {
            return Err("--default-max-tokens must be >= 1, got 0".into());
        }
        let h = self.worker_holdback_seconds;
        if !(h.is_finite() && h >= 0.0) {
            return Err(format!("--worker-holdback-seconds must be >= 0, got {h}"));
        }
        let d = self.drain_timeout_seconds;
        if !(d.is_finite() && d > 0.0) {
            return Err(format!("--drain-timeout-seconds must be > 0, got {d}"));
        }
        let g = self.shutdown_grace_seconds;
        if !(g.is_finite() && g >= 0.0) {
            return Err(format!("--shutdown-grace-seconds must be >= 0, got {g}"));
        }
        let t = self.worker_startup_timeout_seconds;
        if !(t.is_finite() && t > 0.0) {
            return Err(format!(
                "--worker-startup-timeout-seconds must be > 0, got {t}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_repeatable_or_comma_separated_and_decode_is_required() {
        let c = Config::try_parse_from([
            "tandem-router",
            "--decode-worker",
            "a:1,b:2",
            "--decode-worker",
            "c:3",
            "--prefill-worker",
            "p:1",
            "--max-prompt-tokens",
            "9",
        ])
        .expect("parses");
        assert_eq!(c.decode_workers, ["a:1", "b:2", "c:3"]);
        assert_eq!(c.prefill_workers, ["p:1"]);
        assert_eq!(c.limits.max_prompt_tokens, 9);
        assert!(c.validate().is_ok());
        let missing = Config::try_parse_from(["tandem-router"]).unwrap_err();
        assert!(missing.to_string().contains("--decode-worker"), "{missing}");
    }
}
