//! `tandemctl`'s command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tandem_common::generate::GenerateArgs;
use tandem_common::tls::TlsArgs;

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
    /// List workers or pools with their state and live load.
    ///
    /// Example: tandemctl get workers -o json
    Get(GetArgs),
    /// Show one worker in full.
    Describe(DescribeArgs),
    /// Stop sending new requests to a worker; the ones it runs finish.
    Cordon(WorkerArgs),
    /// Send new requests to a cordoned or drained worker again.
    Uncordon(WorkerArgs),
    /// Cordon a worker and wait until it has finished every request it had, showing progress.
    /// Exits non-zero if the timeout passes first (the worker stays cordoned).
    Drain(DrainArgs),
    /// Move a worker to the other pool with its weights loaded: drain it, switch its role,
    /// put it back in service. Shows each step; exits non-zero if it fails (the worker goes
    /// back to its pool as it was).
    ///
    /// Example: tandemctl move decode-1 --to prefill
    Move(MoveArgs),
    /// Move workers one at a time until the pools have the given sizes, with no failed
    /// request. Prints the workers afterwards.
    ///
    /// Example: tandemctl rebalance --prefill 1 --decode 3
    Rebalance(RebalanceArgs),
    /// A live table of workers and pools, refreshed until Ctrl-C.
    Top(TopArgs),
    /// Load a running cluster and report latency percentiles (TTFT, ITL, TPOT, end to end),
    /// throughput and goodput per load level, as a table, JSON and an SVG chart.
    ///
    /// Closed loop with --concurrency, open loop (Poisson) with --rate; a comma-separated list
    /// sweeps. Requests are greedy with end-of-sequence ignored, so each yields exactly its
    /// output length.
    ///
    /// Example: tandemctl bench --isl 128 --osl 32 --concurrency 1,4,16 --chart bench.svg
    Bench(BenchArgs),
    /// Size a fleet on paper: simulate prefill TP, decode EP and P:D splits of --gpus GPUs
    /// for a model on a hardware profile, print the Pareto front of tokens/s per GPU against
    /// tokens/s per user and the best deployment meeting the SLOs.
    ///
    /// Example: tandemctl plan --model config.json --hardware gb200-nvl72 --gpus 72 --isl 1024 --osl 1024
    Plan(PlanArgs),
    /// Fit a hardware profile to Tandem's own kernels from the CUDA engine bench's JSON
    /// (`TANDEM_BENCH_JSON=bench.json cargo bench -p tandem-engine --bench cuda` on the GPU),
    /// print each measured step beside the fitted model's prediction, and write the profile
    /// for `tandemctl plan --hardware`. Runs at two layer counts (`TANDEM_BENCH_LAYERS`) let
    /// the fit tell a layer's overhead from a step's, so it predicts models deeper than the
    /// bench's.
    ///
    /// Example: tandemctl calibrate --bench bench-8.json --bench bench-2.json --base h100 --out
    /// h100-tandem.json
    Calibrate(CalibrateArgs),
    /// How the router places requests.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct PlanArgs {
    /// The model's Hugging Face config.json.
    #[arg(long, value_name = "CONFIG")]
    pub model: PathBuf,
    /// Hardware profile: h100, h200, b200, gb200-nvl72, or a profile JSON file.
    #[arg(long, value_name = "PROFILE")]
    pub hardware: String,
    /// GPUs to deploy on.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub gpus: u32,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub isl: u32,
    /// Output tokens per request.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(2..))]
    pub osl: u32,
    /// p90 time-to-first-token target, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub slo_ttft: f64,
    /// p90 time-per-output-token target, seconds.
    #[arg(long, default_value_t = 0.05)]
    pub slo_tpot: f64,
    /// Requests simulated per (deployment, load) point.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(10..))]
    pub requests: u32,
    /// Replay a trace instead of Poisson arrivals: JSONL lines `{"arrival_s": 0.12,
    /// "prompt_len": 900, "output_len": 150}`, squeezed or stretched to each load (--isl,
    /// --osl and --requests then come from it).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Also print the best tokens/s per GPU at these tokens/s per user (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub at: Vec<f64>,
    /// Write Helm values (deploy/helm/tandem) for the chosen deployment here.
    #[arg(long, value_name = "FILE")]
    pub helm_values: Option<PathBuf>,
    /// `model.path` in those values.
    #[arg(long, default_value = "model")]
    pub model_path: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct CalibrateArgs {
    /// The engine bench's measurements (TANDEM_BENCH_JSON); repeat for runs of the same GPU
    /// at other layer counts.
    #[arg(long, value_name = "FILE", required = true)]
    pub bench: Vec<PathBuf>,
    /// Datasheet profile of the GPU measured (its links and memory size are kept).
    #[arg(long, value_name = "PROFILE")]
    pub base: String,
    /// Where to write the calibrated profile.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Where the router's admin API is and how to get in.
#[derive(Debug, Clone, Args)]
pub struct Endpoint {
    /// The router (host:port); the address `tandemctl up` prints works as is.
    #[arg(
        long,
        env = "TANDEM_ENDPOINT",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub endpoint: String,
    /// Admin token, when the router has one (`--admin-token`).
    #[arg(
        long,
        env = "TANDEM_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    pub format: Format,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How admin verbs print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    /// Objects carry at least `id`, `role` and `state`.
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GetWhat {
    Workers,
    Pools,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[arg(value_enum)]
    pub what: GetWhat,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DescribeWhat {
    Worker,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    #[arg(value_enum)]
    pub what: DescribeWhat,
    pub id: String,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Worker id, as `tandemctl get workers` shows it.
    pub id: String,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Worker id, as `tandemctl get workers` shows it.
    pub id: String,
    /// Seconds to wait; without it, the router's --drain-timeout-seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

/// A worker pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pool {
    Prefill,
    Decode,
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// Worker id, as `tandemctl get workers` shows it.
    pub id: String,
    /// The pool to move it to.
    #[arg(long, value_enum)]
    pub to: Pool,
    /// Seconds to wait for it to drain; without it, the router's --drain-timeout-seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// Prefill workers wanted (0: decode workers prefill their own prompts).
    #[arg(long)]
    pub prefill: u32,
    /// Decode workers wanted (at least 1); prefill + decode is the cluster's worker count.
    #[arg(long)]
    pub decode: u32,
    /// Seconds to wait for each moved worker to drain; without it, the router's
    /// --drain-timeout-seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Stop after this many refreshes (for scripts); without it, until Ctrl-C.
    #[arg(long)]
    pub iterations: Option<u64>,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Args)]
pub struct GenerateCommand {
    #[command(flatten)]
    pub args: GenerateArgs,
    /// Send the prompt to this router (host:port) instead of running the model here; the
    /// cluster's model is used, so --model and --device do not apply.
    #[arg(long, env = "TANDEM_ROUTER", value_name = "HOST:PORT")]
    pub router: Option<String>,
    /// API key the router asks for (its --api-key), with --router.
    #[arg(
        long,
        env = "TANDEM_API_KEY",
        hide_env_values = true,
        requires = "router"
    )]
    pub api_key: Option<String>,
    /// TLS to the router (with --router): --tls-ca verifies it, --tls-cert/--tls-key are
    /// this client's certificate when the router asks for one.
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct BenchArgs {
    /// The router's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub router: String,
    /// Send requests over OpenAI HTTP to this base URL (http://HOST:PORT/v1) instead of gRPC.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// API key the router asks for (its --api-key).
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// TLS to the router, gRPC or HTTP (an https:// --http URL needs --tls-ca).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// random: prompts of --isl tokens; shared-prefix: --groups prefixes of --prefix-len
    /// tokens, each request one of them plus --isl tokens of its own; trace: --trace.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Random)]
    pub workload: WorkloadKind,
    /// Prompt tokens (after the shared prefix, for shared-prefix).
    #[arg(long, default_value_t = 128)]
    pub isl: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 32)]
    pub osl: u32,
    /// shared-prefix: how many distinct prefixes.
    #[arg(long, default_value_t = 4)]
    pub groups: usize,
    /// shared-prefix: tokens in each prefix.
    #[arg(long, default_value_t = 512)]
    pub prefix_len: usize,
    /// trace: a JSONL file, one request per line: {"prompt_ids": [...] or "prompt_len": N,
    /// "output_len": M}.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Requests per load level.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Closed loop: requests in flight at once; a list sweeps (default 8).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Open loop: Poisson arrivals per second; a list sweeps.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Goodput counts requests whose time to first token is within this many ms.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// Goodput counts requests whose time per output token is within this many ms.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart here: the TTFT distribution per load level, and output tokens/s
    /// against tokens/s per user across the sweep.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Seed of the prompts and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Which prompts `tandemctl bench` sends.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    Random,
    SharedPrefix,
    Trace,
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Where a prompt would go among the prefill workers now, and why: each worker's cached
    /// and uncached prompt tokens, the tokens queued there and its score (lower wins).
    ///
    /// Example: tandemctl route explain --prompt "You are a helpful assistant. Hi"
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The prompt as text (tokenized by the router).
    #[arg(long, required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    pub prompt_ids: Vec<u32>,
    #[command(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Args)]
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
    /// The router's OpenAI-compatible HTTP address (`/v1/chat/completions`, …); port 0
    /// picks a free port.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http_listen: SocketAddr,
    /// Tensor-parallel ranks per prefill worker (`--tp`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill_tp: u64,
    /// Expert-parallel ranks per decode worker (`--ep`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub decode_ep: u64,
    /// Seconds each process may take to start before `up` gives up.
    #[arg(long, default_value_t = 300.0)]
    pub startup_timeout_seconds: f64,
}
