//! Tandem's router: the gRPC front door. It validates each request against explicit limits,
//! tokenizes it, admits it (bounded running and waiting), picks the least loaded decode and
//! prefill workers, has the decode worker reserve KV blocks and the prefill worker push the
//! prompt's KV into them, and streams the tokens back. It never links the engine: the model
//! card and tokenizer come from the workers' `Describe`.

mod admin;
mod admission;
mod chat;
pub mod config;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod gate;
mod http;
mod membership;
mod metrics;
mod orchestrate;
mod pool;
mod prefix_index;
mod service;
mod validation;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tandem_common::tls::ClientCertificates;
use tandem_proto::v1::admin_server::AdminServer;
use tandem_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;

pub use config::Config;
pub use error::RouterError;

use crate::admin::{AdminService, authorize};
use crate::admission::Admission;
use crate::membership::Membership;
use crate::orchestrate::Cluster;
use crate::service::{InferenceService, RouterState};
use crate::validation::Validator;

/// Failures that stop the router.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("worker address `{addr}` is not host:port: {reason}")]
    BadWorkerAddress { addr: String, reason: String },
    #[error("worker {addr} did not describe its model within {seconds} s: {last_error}")]
    WorkerUnreachable {
        addr: String,
        seconds: f64,
        last_error: String,
    },
    #[error("no decode worker registered within {seconds} s")]
    NoDecodeWorker { seconds: f64 },
    #[error("registry: {0}")]
    Registry(#[source] tandem_common::registry::RegistryError),
    #[error("two workers have the id `{id}`; give each its own --worker-id")]
    DuplicateWorkerId { id: String },
    #[error("worker {addr} sent a tokenizer that does not load: {reason}")]
    Tokenizer { addr: String, reason: String },
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("tls: {0}")]
    Tls(#[from] tandem_common::tls::TlsError),
}

/// Binds, learns the model from the workers, prints `ready grpc=HOST:PORT` and serves until
/// Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> Result<(), StartError> {
    let clients = if config.tls_anonymous_clients {
        ClientCertificates::Optional
    } else {
        ClientCertificates::Required
    };
    let tls = config.tls.load_component(clients)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let http = match config.http_listen {
        Some(http_addr) => {
            let bind_error = |source| StartError::Bind {
                addr: http_addr,
                source,
            };
            let listener = TcpListener::bind(http_addr).await.map_err(bind_error)?;
            let bound = listener.local_addr().map_err(bind_error)?;
            Some((listener, bound))
        }
        None => None,
    };
    let limits = &config.limits;
    let max_message = limits.max_message_bytes;
    let (membership, card) = Membership::start(&config, tls.clone()).await?;
    let registry = membership.registry();
    let local_records = membership.local_records();
    let cluster = Arc::new(Cluster {
        hold_back: Duration::from_secs_f64(config.worker_holdback_seconds),
        max_attempts: config.max_attempts,
        migration_limit: config.migration_limit,
        routing: config.routing,
        local_prefill_below: config.local_prefill_below,
        ..Cluster::default()
    });
    membership.follow(Arc::clone(&cluster), card.name.clone(), max_message);
    tracing::info!(
        model = %card.name,
        prefill_workers = cluster.prefill.workers().len(),
        decode_workers = cluster.decode.workers().len(),
        "router configured"
    );
    let state = Arc::new(RouterState {
        validator: Validator {
            card,
            limits: limits.clone(),
            default_max_tokens: config.default_max_tokens,
        },
        cluster,
        registry,
        local_records,
        admission: Admission::new(limits.max_concurrent_requests, limits.queue_depth),
        next_request: AtomicU64::new(1),
        gate: gate::ClientGate::new(
            config.api_keys.clone(),
            config
                .rate_limit_per_client
                .map(|per_second| gate::RateLimit {
                    per_second,
                    burst: f64::from(config.rate_limit_burst.max(1)),
                }),
        ),
        metrics: Arc::default(),
    });
    let exporter = Arc::new(metrics::RouterExporter {
        state: Arc::clone(&state),
        serving: AtomicBool::new(false),
    });
    let metrics_addr = match config.metrics_listen {
        Some(addr) => Some(
            tandem_common::metrics::start(addr, Arc::clone(&exporter))
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let inference = InferenceServer::new(InferenceService {
        state: Arc::clone(&state),
    })
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let (mut routes, reporter) = tandem_common::server::standard_routes()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let admin = AdminService {
        state: Arc::clone(&state),
        drain_timeout: Duration::from_secs_f64(config.drain_timeout_seconds),
    };
    let token: Option<Arc<str>> = config.admin_token.as_deref().map(Arc::from);
    routes
        .add_service(inference)
        .add_service(AdminServer::with_interceptor(admin, authorize(token)));
    reporter
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    let mut listening = vec![("grpc", addr)];
    let http = http.map(|(listener, http_addr)| {
        listening.push(("http", http_addr));
        let app = http::routes(Arc::clone(&state), max_message);
        let listener = http::Listener(tandem_common::tls::incoming(listener, tls.as_ref()));
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<http::ClientAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(tandem_common::server::shutdown_signal())
                .await
        })
    });
    listening.extend(metrics_addr.map(|a| ("metrics", a)));
    exporter.serving.store(true, Ordering::Relaxed);
    tandem_common::server::announce_ready(&listening);
    tracing::info!(?listening, "router serving");
    // Tower layers in front of every RPC: a deadline on producing the response, and a bound
    // on calls in progress per connection beyond which calls are shed at once. Admission and
    // the request deadline (inside Generate) bound whole streams.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .trace_fn(tandem_common::telemetry::rpc_span)
        .timeout(limits.request_timeout() + TIMEOUT_BACKSTOP_MARGIN)
        .concurrency_limit_per_connection(
            limits.max_concurrent_requests + limits.queue_depth + HEALTH_HEADROOM,
        )
        .load_shed(true)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(
            tandem_common::tls::incoming(listener, tls.as_ref()),
            async {
                let _ = stopped.await;
            },
        );
    let grace = Duration::from_secs_f64(config.shutdown_grace_seconds);
    tandem_common::server::serve_with_grace(
        server,
        stop,
        grace,
        tandem_common::server::shutdown_signal(),
    )
    .await?;
    if let Some(mut http) = http {
        // Streams still open after the grace period are cut, as gRPC's are.
        if tokio::time::timeout(grace, &mut http).await.is_err() {
            http.abort();
        }
    }
    tracing::info!("router stopped");
    Ok(())
}

/// The tower timeout is a backstop behind the router's own deadline (which names the limit),
/// so it fires only if that one fails to.
const TIMEOUT_BACKSTOP_MARGIN: Duration = Duration::from_secs(1);

/// Calls per connection beyond the request limits, so health checks and model info still get
/// through a full router.
const HEALTH_HEADROOM: usize = 16;
