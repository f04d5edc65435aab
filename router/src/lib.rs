//! Tandem's router: the gRPC front door. It validates each request against explicit limits,
//! tokenizes it, admits it (bounded running and waiting), picks the least loaded decode and
//! prefill workers, has the decode worker reserve KV blocks and the prefill worker push the
//! prompt's KV into them, and streams the tokens back. It never links the engine: the model
//! card and tokenizer come from the workers' `Describe`.

mod admin;
mod admission;
pub mod config;
mod error;
mod orchestrate;
mod pool;
mod service;
mod validation;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tandem_proto::internal::v1::decode_client::DecodeClient;
use tandem_proto::internal::v1::prefill_client::PrefillClient;
use tandem_proto::internal::v1::worker_client::WorkerClient;
use tandem_proto::internal::v1::{DescribeRequest, WorkerDescription};
use tandem_proto::v1::admin_server::AdminServer;
use tandem_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint};

pub use config::Config;
pub use error::RouterError;

use crate::admin::{AdminService, authorize};
use crate::admission::Admission;
use crate::orchestrate::Cluster;
use crate::pool::{Pool, WorkerEntry};
use crate::service::{InferenceService, RouterState};
use crate::validation::{ModelCard, Validator};

/// Wait between attempts to reach a worker that is still starting.
const STARTUP_RETRY: Duration = Duration::from_millis(200);

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
    #[error("workers disagree on the model: {first} serves `{a}`, {second} serves `{b}`")]
    ModelMismatch {
        first: String,
        a: String,
        second: String,
        b: String,
    },
    #[error("two workers have the id `{id}`; give each its own --worker-id")]
    DuplicateWorkerId { id: String },
    #[error("worker {addr} sent a tokenizer that does not load: {reason}")]
    Tokenizer { addr: String, reason: String },
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("grpc server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Binds, learns the model from the workers, prints `ready grpc=HOST:PORT` and serves until
/// Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> Result<(), StartError> {
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
    let limits = &config.limits;
    let max_message = limits.max_message_bytes;
    let channel = |addr: &String| -> Result<(String, Channel), StartError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| {
            StartError::BadWorkerAddress {
                addr: addr.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok((addr.clone(), endpoint.connect_lazy()))
    };
    let prefill: Vec<(String, Channel)> = config
        .prefill_workers
        .iter()
        .map(channel)
        .collect::<Result<_, _>>()?;
    let decode: Vec<(String, Channel)> = config
        .decode_workers
        .iter()
        .map(channel)
        .collect::<Result<_, _>>()?;
    let startup = Duration::from_secs_f64(config.worker_startup_timeout_seconds);
    let mut described: Vec<WorkerDescription> = Vec::new();
    for (addr, channel) in decode.iter().chain(&prefill) {
        let description = describe(addr, channel.clone(), startup).await?;
        if let Some((first, d)) = config.decode_workers.iter().zip(&described).next() {
            if d.model != description.model || d.vocab_size != description.vocab_size {
                return Err(StartError::ModelMismatch {
                    first: first.clone(),
                    a: d.model.clone(),
                    second: addr.clone(),
                    b: description.model,
                });
            }
        }
        if described
            .iter()
            .any(|d| d.worker_id == description.worker_id)
        {
            return Err(StartError::DuplicateWorkerId {
                id: description.worker_id,
            });
        }
        described.push(description);
    }
    let Some(card_source) = described.first() else {
        return Err(StartError::BadWorkerAddress {
            addr: String::new(),
            reason: "no decode worker given".into(),
        });
    };
    let tokenizer =
        tokenizers::Tokenizer::from_bytes(&card_source.tokenizer_json).map_err(|e| {
            StartError::Tokenizer {
                addr: config.decode_workers.first().cloned().unwrap_or_default(),
                reason: e.to_string(),
            }
        })?;
    let card = ModelCard {
        name: card_source.model.clone(),
        vocab_size: card_source.vocab_size,
        max_position_embeddings: card_source.max_position_embeddings,
        eos_token_ids: card_source.eos_token_ids.clone(),
        tokenizer,
    };
    let mut descriptions = described.into_iter();
    let cluster =
        Cluster {
            decode: Pool::new(decode.into_iter().zip(descriptions.by_ref()).map(
                |((addr, channel), d)| {
                    let client = DecodeClient::new(channel.clone())
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message);
                    worker_entry(addr, channel, d, client)
                },
            )),
            prefill: Pool::new(prefill.into_iter().zip(descriptions).map(
                |((addr, channel), d)| {
                    let client = PrefillClient::new(channel.clone())
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message);
                    worker_entry(addr, channel, d, client)
                },
            )),
        };
    tracing::info!(
        model = %card.name,
        prefill_workers = cluster.prefill.workers().count(),
        decode_workers = cluster.decode.workers().count(),
        "router configured"
    );
    let state = Arc::new(RouterState {
        validator: Validator {
            card,
            limits: limits.clone(),
            default_max_tokens: config.default_max_tokens,
        },
        cluster,
        admission: Admission::new(limits.max_concurrent_requests, limits.queue_depth),
        next_request: AtomicU64::new(1),
    });
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
    tandem_common::server::announce_ready(&[("grpc", addr)]);
    tracing::info!(%addr, "router serving");
    // Tower layers in front of every RPC: a deadline on producing the response, and a bound
    // on calls in progress per connection beyond which calls are shed at once. Admission and
    // the request deadline (inside Generate) bound whole streams.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .timeout(limits.request_timeout() + TIMEOUT_BACKSTOP_MARGIN)
        .concurrency_limit_per_connection(
            limits.max_concurrent_requests + limits.queue_depth + HEALTH_HEADROOM,
        )
        .load_shed(true)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        });
    let grace = Duration::from_secs_f64(config.shutdown_grace_seconds);
    tandem_common::server::serve_with_grace(server, stop, grace).await?;
    tracing::info!("router stopped");
    Ok(())
}

/// The tower timeout is a backstop behind the router's own deadline (which names the limit),
/// so it fires only if that one fails to.
const TIMEOUT_BACKSTOP_MARGIN: Duration = Duration::from_secs(1);

/// Calls per connection beyond the request limits, so health checks and model info still get
/// through a full router.
const HEALTH_HEADROOM: usize = 16;

fn worker_entry<C>(
    addr: String,
    channel: Channel,
    description: WorkerDescription,
    client: C,
) -> WorkerEntry<C> {
    WorkerEntry {
        id: description.worker_id,
        addr,
        model: description.model,
        device: description.device,
        client,
        info: WorkerClient::new(channel),
    }
}

/// The worker's model description, retrying while it starts.
async fn describe(
    addr: &str,
    channel: Channel,
    within: Duration,
) -> Result<WorkerDescription, StartError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut client = WorkerClient::new(channel).max_decoding_message_size(usize::MAX);
    loop {
        match client.describe(DescribeRequest {}).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if tokio::time::Instant::now() + STARTUP_RETRY >= deadline => {
                return Err(StartError::WorkerUnreachable {
                    addr: addr.to_owned(),
                    seconds: within.as_secs_f64(),
                    last_error: status.message().to_owned(),
                });
            }
            Err(_) => tokio::time::sleep(STARTUP_RETRY).await,
        }
    }
}
