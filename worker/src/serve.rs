//! Loading the model a worker serves and running its gRPC server.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tandem_common::registry::{EtcdRegistry, Registry, RegistryError, WorkerRecord, WorkerRole};
use tandem_engine::{Device, EngineError, ServedModel};
use tandem_proto::internal::v1::{Role, WorkerDescription};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::args::WorkerArgs;

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
}

/// A worker's model and the description it gives routers.
pub struct LoadedWorker {
    pub served: ServedModel,
    pub description: WorkerDescription,
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind_error = |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// Loads `--model` (or the demo model) and describes it for `role`, served at `addr`.
pub fn load_model(
    args: &WorkerArgs,
    role: Role,
    addr: SocketAddr,
) -> Result<LoadedWorker, EngineError> {
    let started = Instant::now();
    let served = ServedModel::load(args.model.as_deref(), args.device_choice(), &mut |_| {})?;
    let Device::Cpu { fallback_reason } = &served.device;
    if let Some(reason) = fallback_reason {
        tracing::info!(reason = %reason, "device auto: using cpu");
    }
    let c = served.model.config();
    let description = WorkerDescription {
        role: role as i32,
        model: served.name.clone(),
        vocab_size: c.vocab_size as u32,
        max_position_embeddings: c.max_position_embeddings as u32,
        eos_token_ids: served.tokenizer.eos_token_ids(),
        num_layers: c.num_layers as u32,
        num_kv_heads: c.num_kv_heads as u32,
        head_dim: c.head_dim as u32,
        tokenizer_json: served.tokenizer_json.clone(),
        device: served.model.backend_name().to_owned(),
        worker_id: args.worker_id.clone().unwrap_or_else(|| {
            let role = if role == Role::Prefill {
                "prefill"
            } else {
                "decode"
            };
            format!("{role}@{addr}")
        }),
    };
    tracing::info!(
        model = %served.name,
        dir = %served.dir.display(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(LoadedWorker {
        served,
        description,
    })
}

/// Health, reflection and `tandem.internal.v1.Worker` (serving `info`) routes; the worker
/// adds its role's service and marks it serving.
pub async fn routes<C: Send + 'static>(
    info: crate::WorkerInfoService<C>,
) -> Result<
    (
        tonic::service::RoutesBuilder,
        tonic_health::server::HealthReporter,
    ),
    ServeError,
> {
    use tandem_proto::internal::v1::worker_server::WorkerServer;
    let (mut routes, reporter) = tandem_common::server::standard_routes()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // Describe carries tokenizer.json, which can be larger than any request limit.
    routes.add_service(WorkerServer::new(info).max_encoding_message_size(usize::MAX));
    reporter
        .set_serving::<WorkerServer<crate::WorkerInfoService<C>>>()
        .await;
    Ok((routes, reporter))
}

/// A worker ready to serve: its routes, listener, ready-line fields and registry record.
pub struct Serving<'a> {
    pub routes: tonic::service::RoutesBuilder,
    pub listener: TcpListener,
    pub ready: &'a [(&'a str, SocketAddr)],
    pub description: &'a WorkerDescription,
    pub grpc_addr: SocketAddr,
    /// Reports the role's service (`role_service`) NOT_SERVING while an SRE has the worker
    /// cordoned, so probes and load balancers see it too.
    pub health: tonic_health::server::HealthReporter,
    pub role_service: &'static str,
}

/// Registers in etcd (with `--etcd`), prints the ready line, then serves until Ctrl-C,
/// SIGTERM or a lost lease, and drains for at most the grace period.
pub async fn serve_grpc(serving: Serving<'_>, args: &WorkerArgs) -> Result<(), ServeError> {
    let Serving {
        routes,
        listener,
        ready,
        description,
        grpc_addr,
        health,
        role_service,
    } = serving;
    let mut registration = match &args.etcd {
        Some(endpoint) => {
            let registry = EtcdRegistry::new(
                endpoint,
                &args.cluster,
                Duration::from_secs(args.lease_ttl_seconds.max(1)),
            )?;
            let desired = registry.watch_desired().await?;
            tokio::spawn(follow_desired_state(
                desired,
                description.worker_id.clone(),
                health,
                role_service,
            ));
            let record = WorkerRecord {
                id: description.worker_id.clone(),
                role: if description.role == Role::Prefill as i32 {
                    WorkerRole::Prefill
                } else {
                    WorkerRole::Decode
                },
                grpc: grpc_addr.to_string(),
                model: description.model.clone(),
                device: description.device.clone(),
            };
            let registration = registry.register(record).await?;
            tracing::info!(etcd = %endpoint, cluster = %args.cluster, id = %description.worker_id, "registered");
            Some(registration)
        }
        None => None,
    };
    tandem_common::server::announce_ready(ready);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        });
    let lease_lost = std::sync::atomic::AtomicBool::new(false);
    let until = async {
        let lost = async {
            match registration.as_mut() {
                Some(r) => r.lost().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tandem_common::server::shutdown_signal() => {}
            () = lost => {
                tracing::error!("registry lease expired: taking no new work, finishing what runs");
                lease_lost.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    tandem_common::server::serve_with_grace(server, stop, args.shutdown_grace(), until).await?;
    drop(registration);
    if lease_lost.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ServeError::LeaseLost);
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Mirrors what SREs asked of this worker in its health: NOT_SERVING while cordoned or
/// draining (routers already send it nothing), SERVING otherwise.
async fn follow_desired_state(
    mut desired: tokio::sync::watch::Receiver<tandem_common::registry::DesiredStates>,
    id: String,
    health: tonic_health::server::HealthReporter,
    service: &'static str,
) {
    let mut cordoned = false;
    while desired.changed().await.is_ok() {
        let now = desired
            .borrow_and_update()
            .get(&id)
            .is_some_and(|d| d.cordoned || d.draining);
        if now != cordoned {
            cordoned = now;
            let status = if cordoned {
                tonic_health::ServingStatus::NotServing
            } else {
                tonic_health::ServingStatus::Serving
            };
            tracing::info!(cordoned, "desired state changed");
            health.set_service_status(service, status).await;
        }
    }
}

/// A worker binary's `main`: logging, a runtime, `serve`, and the exit code (64 for bad
/// configuration).
pub fn main_with<F>(serve: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), ServeError>>,
{
    tandem_common::telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve) {
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
