use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tandem_common::generate::DeviceArg;
use tandem_common::limits::DEFAULT_MAX_PROMPT_TOKENS;
use tandem_engine::{DeviceChoice, EngineConfig, Sharding};

/// Flags every worker takes.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct WorkerArgs {
    /// gRPC address to listen on; port 0 picks a free port (printed on the ready line).
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// gRPC address (host:port) routers are told to reach this worker at, when it differs
    /// from the bound one (a pod IP or DNS name behind 0.0.0.0).
    #[arg(long, env = "TANDEM_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Address for Prometheus metrics (`/metrics`) and probes (`/healthz`; `/readyz` once the
    /// model is loaded and the worker serves), plain HTTP; port 0 picks one
    /// (`metrics=HOST:PORT` on the ready line). Off when unset.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// This worker's id in the cluster, what admin commands name it by. Default:
    /// `<role>@<listen address>`.
    #[arg(long, env = "TANDEM_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Hugging Face checkpoint folder; without it, the built-in demo model.
    #[arg(long, env = "TANDEM_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Where the model runs: `auto` takes GPU 0 when libcuda, libnvrtc, libcublas and a GPU are
    /// found (and logs why not otherwise); `cuda` fails instead of falling back.
    #[arg(long, value_enum, env = "TANDEM_DEVICE", default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Tokens per KV block.
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks per layer (the cache holds block_size × num_blocks tokens).
    #[arg(long, env = "TANDEM_NUM_BLOCKS", default_value_t = 2048)]
    pub num_blocks: usize,
    /// Most tokens one engine step computes, and so the chunk a long prompt is computed in.
    /// Default: 512 on the CPU; 8192 on a GPU, where a prompt in chunks reads every expert's
    /// weights once a chunk (a 2048-token prompt in 512-token chunks takes ~2.6× as long).
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS", value_name = "TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Most sequences in the running batch (decode: also counts reservations).
    #[arg(long, env = "TANDEM_MAX_RUNNING", default_value_t = 256)]
    pub max_running: usize,
    /// Do not keep computed prompt blocks for reuse by later prompts with the same prefix
    /// (and so publish no KV events for KV-aware routing).
    #[arg(long, env = "TANDEM_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Do not share this worker's KV cache with prefill workers on the same GPU (CUDA IPC),
    /// which write prompts' KV straight into it; they then send it through the KV listener.
    #[arg(long, env = "TANDEM_NO_SHARED_KV")]
    pub no_shared_kv: bool,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "TANDEM_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Largest KV frame (one layer of one request) sent or accepted, in bytes.
    #[arg(long, env = "TANDEM_MAX_KV_FRAME_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_kv_frame_bytes: usize,
    /// Requests waiting for the engine thread before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_QUEUE_DEPTH", default_value_t = 1024)]
    pub queue_depth: usize,
    /// etcd endpoint (host:port) to register in, so routers find this worker. Without it, the
    /// router is given this worker's address.
    #[arg(long, env = "TANDEM_ETCD_ENDPOINT")]
    pub etcd: Option<String>,
    /// Cluster name: the etcd key prefix `/tandem/<cluster>/`.
    #[arg(long, env = "TANDEM_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Seconds the registration outlives this worker if it stops renewing it (renewed every
    /// third of it). If etcd reports it expired, the worker stops taking work, finishes what
    /// it runs and exits non-zero.
    #[arg(long, env = "TANDEM_LEASE_TTL_SECONDS", default_value_t = 10)]
    pub lease_ttl_seconds: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_SECONDS", default_value_t = 30.0)]
    pub shutdown_grace_seconds: f64,
    /// Address the KV listener binds: prefill workers push KV here while this worker decodes.
    /// Every worker listens, so it can be moved to the decode pool.
    #[arg(long, env = "TANDEM_KV_LISTEN", default_value = "127.0.0.1:0")]
    pub kv_listen: SocketAddr,
    /// Address prefill workers are told to push KV to, when it differs from the bound one
    /// (a pod IP behind 0.0.0.0).
    #[arg(long, env = "TANDEM_KV_ADVERTISE")]
    pub kv_advertise: Option<SocketAddr>,
    /// Seconds a decode reservation waits for its KV before its blocks are freed.
    #[arg(
        long,
        env = "TANDEM_KV_TRANSFER_TIMEOUT_SECONDS",
        default_value_t = 30.0
    )]
    pub kv_transfer_timeout_seconds: f64,
    /// Tensor parallelism: ranks splitting every layer's attention heads and MLP width, with
    /// an all-reduce after each (for prefill). Rank r runs on GPU r (threads on CPU).
    #[arg(long = "tp", env = "TANDEM_TP", default_value_t = 1)]
    pub tensor_parallel: usize,
    /// Expert parallelism: ranks splitting the experts, each serving its own requests with
    /// its own KV cache, tokens exchanged all-to-all around every MoE block (for decode).
    #[arg(long = "ep", env = "TANDEM_EP", default_value_t = 1)]
    pub expert_parallel: usize,
    /// JSON file placing experts on expert-parallel ranks: `{"owner": [rank of expert 0,
    /// …]}`. Default: expert e on rank e mod --ep.
    #[arg(long, env = "TANDEM_EXPERT_PLACEMENT", value_name = "FILE")]
    pub expert_placement: Option<PathBuf>,
    /// Seconds a rank of a --tp or --ep group (ranks sharing a host, not NCCL) waits for a
    /// peer's part of a collective before failing the step: ranks run in lockstep, so a long
    /// wait means a stuck or dead rank.
    #[arg(
        long,
        env = "TANDEM_COLLECTIVE_TIMEOUT_SECONDS",
        default_value_t = 120.0
    )]
    pub collective_timeout_seconds: f64,
    /// TLS between this worker and routers and peer workers (gRPC and KV), mutual: every
    /// connection presents a certificate from --tls-ca.
    #[command(flatten)]
    pub tls: tandem_common::tls::TlsArgs,
    #[command(flatten)]
    pub traces: tandem_common::telemetry::TraceArgs,
}

impl WorkerArgs {
    /// Checks what clap cannot: the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.kv_transfer_timeout_seconds;
        if !(t.is_finite() && t > 0.0) {
            return Err(format!(
                "--kv-transfer-timeout-seconds must be > 0, got {t}"
            ));
        }
        if self.queue_depth == 0 {
            return Err("--queue-depth must be >= 1".into());
        }
        let c = self.collective_timeout_seconds;
        if !(c.is_finite() && c > 0.0) {
            return Err(format!("--collective-timeout-seconds must be > 0, got {c}"));
        }
        self.sharding().validate()
    }

    pub fn kv_transfer_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.kv_transfer_timeout_seconds)
    }

    pub fn sharding(&self) -> Sharding {
        Sharding {
            tensor_parallel: self.tensor_parallel,
            expert_parallel: self.expert_parallel,
            expert_placement: self.expert_placement.clone(),
            collective_timeout: std::time::Duration::from_secs_f64(self.collective_timeout_seconds),
        }
    }

    /// The engine's settings for a model on `backend` ([`tandem_engine::Backend::name`]).
    pub fn engine_config(&self, backend: &str) -> EngineConfig {
        EngineConfig {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            max_batch_tokens: self
                .max_batch_tokens
                .unwrap_or_else(|| default_max_batch_tokens(backend)),
            max_running: self.max_running,
            prefix_caching: !self.no_prefix_caching,
        }
    }

    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.shutdown_grace_seconds.max(0.0))
    }

    pub fn device_choice(&self) -> DeviceChoice {
        device_choice(self.device)
    }
}

/// `--max-batch-tokens` where it is not given: a GPU computes a whole prompt (up to the
/// router's default `--max-prompt-tokens`) in one pass, the CPU in chunks that keep other
/// sequences' steps coming.
fn default_max_batch_tokens(backend: &str) -> usize {
    match backend {
        "cpu" => 512,
        _ => DEFAULT_MAX_PROMPT_TOKENS as usize,
    }
}

/// The engine's reading of `--device`.
pub fn device_choice(arg: DeviceArg) -> DeviceChoice {
    match arg {
        DeviceArg::Auto => DeviceChoice::Auto,
        DeviceArg::Cpu => DeviceChoice::Cpu,
        DeviceArg::Cuda => DeviceChoice::Cuda,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    fn max_batch_tokens(flags: &[&str], backend: &str) -> usize {
        let cli = Cli::try_parse_from(std::iter::once("worker").chain(flags.iter().copied()))
            .expect("flags parse");
        cli.worker.engine_config(backend).max_batch_tokens
    }

    #[test]
    fn gpus_take_whole_prompts_by_default_and_the_flag_wins_everywhere() {
        assert_eq!(max_batch_tokens(&[], "cpu"), 512);
        assert_eq!(max_batch_tokens(&[], "cuda"), 8192);
        for backend in ["cpu", "cuda"] {
            assert_eq!(
                max_batch_tokens(&["--max-batch-tokens", "100"], backend),
                100
            );
        }
    }
}
