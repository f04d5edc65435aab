//! `tandem-decode-worker serve`: the decode role of a cluster.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use clap::Args;
use tandem_engine::Engine;
use tandem_kv_transfer::KvListener;
use tandem_proto::internal::v1::Role;
use tandem_proto::internal::v1::decode_server::DecodeServer;
use tandem_worker::{
    ServeError, Serving, WorkerArgs, WorkerInfoService, bind, load_model, serve_grpc,
};
use tokio::sync::mpsc;

use crate::engine_thread::{Command, EngineThread};
use crate::service::{DecodeService, KvLayout, run_kv_intake};

/// Arriving KV frames buffered before the listener stops reading (and senders slow down).
const KV_FRAME_QUEUE: usize = 64;

/// Flags of `serve`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Address the KV listener binds (prefill workers push KV here).
    #[arg(long, env = "TANDEM_KV_LISTEN", default_value = "127.0.0.1:0")]
    pub kv_listen: SocketAddr,
    /// Address prefill workers are told to push KV to, when it differs from the bound one
    /// (a pod IP behind 0.0.0.0).
    #[arg(long, env = "TANDEM_KV_ADVERTISE")]
    pub kv_advertise: Option<SocketAddr>,
    /// Seconds a reservation waits for its KV before its blocks are freed.
    #[arg(
        long,
        env = "TANDEM_KV_TRANSFER_TIMEOUT_SECONDS",
        default_value_t = 30.0
    )]
    pub kv_transfer_timeout_seconds: f64,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), ServeError> {
        let t = self.kv_transfer_timeout_seconds;
        if !(t.is_finite() && t > 0.0) {
            return Err(ServeError::Config(format!(
                "--kv-transfer-timeout-seconds must be > 0, got {t}"
            )));
        }
        Ok(())
    }
}

/// Loads the model, binds both listeners, prints `ready grpc=… kv=…` and serves until Ctrl-C
/// or SIGTERM.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    config.validate()?;
    let args = &config.worker;
    let (grpc, grpc_addr) = bind(args.listen).await?;
    let kv = KvListener::bind(config.kv_listen, args.max_kv_frame_bytes)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.kv_listen,
            source,
        })?;
    let kv_addr = kv.local_addr().map_err(|source| ServeError::Bind {
        addr: config.kv_listen,
        source,
    })?;

    let loaded = load_model(args, Role::Decode, grpc_addr)?;
    let description = loaded.description.clone();
    let layout = KvLayout {
        kv_heads: loaded.description.num_kv_heads,
        head_dim: loaded.description.head_dim,
    };
    let engine = Engine::new(
        loaded.served.model,
        Some(loaded.served.tokenizer),
        args.engine_config(),
    )?;
    let (commands, commands_rx) = mpsc::channel(args.queue_depth.max(1));
    let timeout = Duration::from_secs_f64(config.kv_transfer_timeout_seconds);
    EngineThread::spawn(engine, commands_rx, timeout).map_err(ServeError::Thread)?;

    let (frames, frames_rx) = mpsc::channel(KV_FRAME_QUEUE);
    tokio::spawn(kv.run(frames));
    tokio::spawn(run_kv_intake(frames_rx, commands.clone(), layout));

    let decode = DecodeService {
        commands: commands.clone(),
        kv_endpoint: config.kv_advertise.unwrap_or(kv_addr),
        next_id: AtomicU64::new(1),
        queue_depth: args.queue_depth,
    };
    let worker = WorkerInfoService::new(
        commands,
        |reply| Command::Stats { reply },
        description.clone(),
    );
    let (mut routes, reporter) = tandem_worker::routes(worker).await?;
    let max = args.max_message_bytes;
    routes.add_service(
        DecodeServer::new(decode)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    reporter.set_serving::<DecodeServer<DecodeService>>().await;
    tracing::info!(grpc = %grpc_addr, kv = %kv_addr, "decode worker serving");
    serve_grpc(
        Serving {
            routes,
            listener: grpc,
            ready: &[("grpc", grpc_addr), ("kv", kv_addr)],
            description: &description,
            grpc_addr,
            health: reporter,
            role_service: <DecodeServer<DecodeService> as tonic::server::NamedService>::NAME,
        },
        args,
    )
    .await
}
