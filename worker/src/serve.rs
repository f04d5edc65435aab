//! Loading the model a worker serves and running its gRPC server.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tandem_common::registry::{DesiredStates, EtcdRegistry, Registry, RegistryError, WorkerRole};
use tandem_common::tls::{ClientCertificates, Tls};
use tandem_engine::{Backend, EngineError, Served, ServedModel};
use tandem_kv_transfer::{KvListener, TcpKvSender};
use tandem_proto::internal::v1::decode_server::DecodeServer;
use tandem_proto::internal::v1::prefill_server::PrefillServer;
use tandem_proto::internal::v1::worker_server::WorkerServer;
use tandem_proto::internal::v1::{Role, WorkerDescription};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::args::WorkerArgs;
use crate::decode::{DecodeService, KvLayout, run_kv_intake};
use crate::host::{EngineSettings, Host};
use crate::info::WorkerInfoService;
use crate::metrics::{WorkerExporter, WorkerMetrics};
use crate::prefill::PrefillService;

/// Arriving KV frames buffered before the listener stops reading (and senders slow down).
const KV_FRAME_QUEUE: usize = 64;

/// Exit code for bad command-line input (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Failures that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("loading the model: {0}")]
    Load(#[from] EngineError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the engine thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("registering: {0}")]
    Registry(#[from] RegistryError),
    #[error("the registry lease expired; stopped after finishing the running requests")]
    LeaseLost,
    #[error("tls: {0}")]
    Tls(#[from] tandem_common::tls::TlsError),
}

/// Binds a listener, naming the address in the error.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind_error = |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// The worker's bound gRPC and KV listeners.
struct Listeners {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    kv: KvListener,
    kv_addr: SocketAddr,
    tls: Option<Tls>,
    metrics: Arc<WorkerMetrics>,
    metrics_addr: Option<SocketAddr>,
}

/// What the worker tells routers about itself and `served`, starting in `role` at `addr`.
fn describe<B: Backend>(
    args: &WorkerArgs,
    role: Role,
    addr: &str,
    served: &ServedModel<B>,
) -> WorkerDescription {
    let c = served.model().config();
    WorkerDescription {
        role: role as i32,
        model: served.name.clone(),
        vocab_size: c.vocab_size as u32,
        max_position_embeddings: c.max_position_embeddings as u32,
        eos_token_ids: served.tokenizer.eos_token_ids(),
        num_layers: c.num_layers as u32,
        num_kv_heads: c.num_kv_heads as u32,
        head_dim: c.head_dim as u32,
        tokenizer_json: served.tokenizer_json.clone(),
        tokenizer_config_json: served.tokenizer_config_json.clone(),
        block_size: args.block_size as u32,
        device: served.model().backend_name().to_owned(),
        worker_id: args.worker_id.clone().unwrap_or_else(|| {
            let role = if role == Role::Prefill {
                "prefill"
            } else {
                "decode"
            };
            format!("{role}@{addr}")
        }),
        tensor_parallel: args.tensor_parallel as u32,
        expert_parallel: args.expert_parallel as u32,
    }
}

/// Loads the model on the device `--device` resolves to, binds gRPC and KV listeners, starts
/// in `default_role` (or the role an SRE moved this worker to, recorded in etcd), registers,
/// prints `ready grpc=HOST:PORT kv=HOST:PORT`, then serves until Ctrl-C, SIGTERM or a lost
/// lease and drains for at most the grace period.
pub async fn run(args: WorkerArgs, default_role: Role) -> Result<(), ServeError> {
    args.validate().map_err(ServeError::Config)?;
    let tls = args.tls.load_component(ClientCertificates::Required)?;
    let (grpc, grpc_addr) = bind(args.listen).await?;
    let kv_bind_error = |source| ServeError::Bind {
        addr: args.kv_listen,
        source,
    };
    let kv = KvListener::bind(args.kv_listen, args.max_kv_frame_bytes, tls.clone())
        .await
        .map_err(kv_bind_error)?;
    let kv_addr = kv.local_addr().map_err(kv_bind_error)?;
    // Metrics and probes answer while the model loads: live, not ready.
    let metrics = Arc::new(WorkerMetrics::default());
    let metrics_addr = match args.metrics_listen {
        Some(addr) => Some(
            tandem_common::metrics::start(addr, Arc::new(WorkerExporter(Arc::clone(&metrics))))
                .await
                .map_err(|source| ServeError::Bind { addr, source })?,
        ),
        None => None,
    };
    let listeners = Listeners {
        grpc,
        grpc_addr,
        kv,
        kv_addr,
        tls,
        metrics,
        metrics_addr,
    };
    let started = Instant::now();
    let sharding = args.sharding();
    match Served::load(
        args.model.as_deref(),
        args.device_choice(),
        &sharding,
        &mut |_| {},
    )? {
        Served::Cpu {
            served,
            fallback_reason,
        } => {
            if let Some(reason) = fallback_reason {
                tracing::info!(reason = %reason, "device auto: using cpu");
            }
            serve_model(args, default_role, listeners, *served, started).await
        }
        Served::Cuda(served) => serve_model(args, default_role, listeners, *served, started).await,
    }
}

/// Serves `served` (loaded since `started`) on `listeners`: see [`run`].
async fn serve_model<B: Backend>(
    args: WorkerArgs,
    default_role: Role,
    listeners: Listeners,
    served: ServedModel<B>,
    started: Instant,
) -> Result<(), ServeError> {
    let Listeners {
        grpc,
        grpc_addr,
        kv,
        kv_addr,
        tls,
        metrics,
        metrics_addr,
    } = listeners;
    let advertised = args
        .advertise
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());
    let description = describe(&args, default_role, &advertised, &served);
    let config = args.engine_config(served.model().backend_name());
    tracing::info!(
        model = %served.name,
        dir = %served.dir.display(),
        device = %description.device,
        max_batch_tokens = config.max_batch_tokens,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let d = &description;
    let (num_layers, kv_heads, head_dim) = (d.num_layers as usize, d.num_kv_heads, d.head_dim);
    let engine = served.into_engines(config)?;
    let shared_kv = if args.no_shared_kv {
        None
    } else {
        // A failure only costs the fast path: KV then goes through the listener.
        engine.share_kv().unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot share the kv cache; prefill workers will send it");
            None
        })
    };

    let registry = args
        .etcd
        .as_deref()
        .map(|endpoint| {
            EtcdRegistry::new(
                endpoint,
                &args.cluster,
                Duration::from_secs(args.lease_ttl_seconds.max(1)),
            )
        })
        .transpose()?;
    let desired = match &registry {
        Some(registry) => Some(desired_states(registry, &args).await?),
        None => None,
    };
    let id = description.worker_id.clone();
    let role = desired
        .as_ref()
        .and_then(|d| d.borrow().get(&id).and_then(|s| s.role))
        .map_or(default_role, |role| match role {
            WorkerRole::Prefill => Role::Prefill,
            WorkerRole::Decode => Role::Decode,
        });

    let (mut routes, health) = tandem_common::server::standard_routes()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let settings = EngineSettings {
        queue_depth: args.queue_depth,
        kv_transfer_timeout: args.kv_transfer_timeout(),
        kv_shared: shared_kv.is_some(),
    };
    let host = Arc::new(Host::new(description, advertised, settings, health.clone()));
    host.start(role, engine).map_err(ServeError::Thread)?;
    let scraped = Arc::clone(&host);
    metrics.set_source(Box::new(move || {
        let host = Arc::clone(&scraped);
        Box::pin(async move { host.stats().await.ok() })
    }));

    let (frames, frames_rx) = mpsc::channel(KV_FRAME_QUEUE);
    tokio::spawn(kv.run(frames));
    let layout = KvLayout {
        kv_heads,
        head_dim,
        shares_kv: shared_kv.is_some(),
    };
    tokio::spawn(run_kv_intake(frames_rx, Arc::clone(&host.decode), layout));

    let max = args.max_message_bytes;
    // Describe carries tokenizer.json, which can be larger than any request limit.
    routes.add_service(
        WorkerServer::new(WorkerInfoService {
            host: Arc::clone(&host),
        })
        .max_encoding_message_size(usize::MAX),
    );
    routes.add_service(
        PrefillServer::new(PrefillService {
            commands: Arc::clone(&host.prefill),
            sender: TcpKvSender::new(args.max_kv_frame_bytes, tls.clone()),
            metrics: Arc::clone(&metrics),
            next_id: AtomicU64::new(1),
            queue_depth: args.queue_depth,
            num_layers,
            kv_heads,
            head_dim,
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
    );
    routes.add_service(
        DecodeServer::new(DecodeService {
            commands: Arc::clone(&host.decode),
            kv_endpoint: args.kv_advertise.unwrap_or(kv_addr),
            shared_kv: shared_kv.unwrap_or_default(),
            next_id: AtomicU64::new(1),
            queue_depth: args.queue_depth,
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
    );
    health
        .set_serving::<WorkerServer<WorkerInfoService<B>>>()
        .await;
    host.refresh_health().await;

    if let (Some(registry), Some(desired)) = (&registry, desired) {
        let registration = registry.register(host.record()).await?;
        host.set_registration(registration);
        tracing::info!(etcd = ?args.etcd, cluster = %args.cluster, id = %id, "registered");
        tokio::spawn(follow_desired_state(desired, Arc::clone(&host)));
    }
    tracing::info!(grpc = %grpc_addr, kv = %kv_addr, role = role.as_str_name(), "worker serving");
    let mut listening = vec![("grpc", grpc_addr), ("kv", kv_addr)];
    listening.extend(metrics_addr.map(|a| ("metrics", a)));
    tandem_common::server::announce_ready(&listening);
    metrics.set_serving(true);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .trace_fn(tandem_common::telemetry::rpc_span)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(tandem_common::tls::incoming(grpc, tls.as_ref()), async {
            let _ = stopped.await;
        });
    let lease_lost = AtomicBool::new(false);
    let lease_lost_flag = &lease_lost;
    let registration = host.registration();
    let stopping = Arc::clone(&host);
    let until = async move {
        let signalled = {
            let lost = async {
                match &registration {
                    Some(r) => r.lost().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tandem_common::server::shutdown_signal() => true,
                () = lost => false,
            }
        };
        if signalled {
            tracing::info!("stopping: deregistered, taking no new work, finishing what runs");
        } else {
            tracing::error!("registry lease expired: taking no new work, finishing what runs");
            lease_lost_flag.store(true, Ordering::Relaxed);
        }
        // Routers drop the record at once, and probes see NOT_SERVING, while running work
        // finishes within the grace period.
        drop(registration);
        metrics.set_serving(false);
        stopping.deregister();
        stopping.stop_serving().await;
    };
    tandem_common::server::serve_with_grace(server, stop, args.shutdown_grace(), until).await?;
    if lease_lost.load(Ordering::Relaxed) {
        return Err(ServeError::LeaseLost);
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// The desired states in etcd, once the current ones are known (or after the startup wait),
/// so a moved worker restarts in its new role.
async fn desired_states(
    registry: &EtcdRegistry,
    args: &WorkerArgs,
) -> Result<watch::Receiver<DesiredStates>, ServeError> {
    let mut desired = registry.watch_desired().await?;
    let wait = Duration::from_secs(args.lease_ttl_seconds.max(1));
    if tokio::time::timeout(wait, desired.changed()).await.is_err() {
        tracing::warn!(
            seconds = wait.as_secs(),
            "etcd gave no desired states yet; starting in the default role"
        );
    }
    desired.borrow_and_update();
    Ok(desired)
}

/// Mirrors what SREs asked of this worker in its health: NOT_SERVING while cordoned or
/// draining (routers already send it nothing), SERVING otherwise.
async fn follow_desired_state<B: Backend>(
    mut desired: watch::Receiver<DesiredStates>,
    host: Arc<Host<B>>,
) {
    let id = host.description().worker_id;
    loop {
        let cordoned = desired
            .borrow_and_update()
            .get(&id)
            .is_some_and(|d| d.cordoned || d.draining);
        host.set_cordoned(cordoned).await;
        if desired.changed().await.is_err() {
            return;
        }
    }
}

/// A worker binary's `serve`: a runtime, logs and traces, [`run`], and the exit code (64 for
/// bad configuration).
pub fn serve_main(args: WorkerArgs, default_role: Role) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let service = match default_role {
        Role::Prefill => "tandem-prefill-worker",
        _ => "tandem-decode-worker",
    };
    let served = runtime.block_on(async {
        let _telemetry = tandem_common::telemetry::init_with_traces(service, &args.traces);
        run(args, default_role).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ServeError::Config(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
