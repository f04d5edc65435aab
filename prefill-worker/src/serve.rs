//! `tandem-prefill-worker serve`: the prefill role of a cluster.

use std::sync::atomic::AtomicU64;

use clap::Args;
use tandem_engine::Engine;
use tandem_kv_transfer::TcpKvSender;
use tandem_proto::internal::v1::Role;
use tandem_proto::internal::v1::prefill_server::PrefillServer;
use tandem_worker::{
    ServeError, Serving, WorkerArgs, WorkerInfoService, bind, load_model, serve_grpc,
};
use tokio::sync::mpsc;

use crate::engine_thread::{Command, EngineThread};
use crate::service::PrefillService;

/// Flags of `serve`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// Loads the model, prints `ready grpc=…` and serves until Ctrl-C or SIGTERM.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    let args = &config.worker;
    let (grpc, grpc_addr) = bind(args.listen).await?;
    let loaded = load_model(args, Role::Prefill, grpc_addr)?;
    let description = loaded.description.clone();
    let d = &loaded.description;
    let (num_layers, kv_heads, head_dim) = (d.num_layers as usize, d.num_kv_heads, d.head_dim);
    let engine = Engine::new(
        loaded.served.model,
        Some(loaded.served.tokenizer),
        args.engine_config(),
    )?;
    let (commands, commands_rx) = mpsc::channel(args.queue_depth.max(1));
    EngineThread::spawn(engine, commands_rx).map_err(ServeError::Thread)?;

    let prefill = PrefillService {
        commands: commands.clone(),
        sender: TcpKvSender::new(args.max_kv_frame_bytes),
        next_id: AtomicU64::new(1),
        queue_depth: args.queue_depth,
        num_layers,
        kv_heads,
        head_dim,
    };
    let worker = WorkerInfoService::new(
        commands,
        |reply| Command::Stats { reply },
        description.clone(),
    );
    let (mut routes, reporter) = tandem_worker::routes(worker).await?;
    let max = args.max_message_bytes;
    routes.add_service(
        PrefillServer::new(prefill)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    reporter
        .set_serving::<PrefillServer<PrefillService>>()
        .await;
    tracing::info!(grpc = %grpc_addr, "prefill worker serving");
    serve_grpc(
        Serving {
            routes,
            listener: grpc,
            ready: &[("grpc", grpc_addr)],
            description: &description,
            grpc_addr,
            health: reporter,
            role_service: <PrefillServer<PrefillService> as tonic::server::NamedService>::NAME,
        },
        args,
    )
    .await
}
