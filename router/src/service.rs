//! `tandem.v1.Inference` on the router.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tandem_common::ids::RequestId;
use tandem_proto::v1::inference_server::Inference;
use tandem_proto::v1::{
    GenerateError, GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse,
    TokenizeRequest, TokenizeResponse, generate_response,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::admission::Admission;
use crate::error::RouterError;
use crate::metrics::{RouterMetrics, outcome_of};
use crate::orchestrate::{Cluster, Responder};
use crate::validation::Validator;

/// Metadata key carrying the client's request id.
pub(crate) const REQUEST_ID_HEADER: &str = "x-tandem-request-id";
/// Responses buffered per stream before the router waits for the client to read.
const STREAM_BUFFER: usize = 16;

/// What every request shares.
pub(crate) struct RouterState {
    pub validator: Validator,
    pub cluster: Arc<Cluster>,
    /// Where admin changes are recorded, so every router applies them.
    pub registry: Arc<dyn tandem_common::registry::Registry>,
    /// Records this router publishes itself (local mode); a move updates them.
    pub local_records: Arc<crate::membership::LocalRecords>,
    pub admission: Admission,
    pub next_request: AtomicU64,
    /// API keys and per-client rate limits.
    pub gate: crate::gate::ClientGate,
    pub metrics: Arc<RouterMetrics>,
}

/// The `authorization` value of a gRPC call.
fn authorization<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

impl InferenceService {
    /// The calling client, refused without a valid API key when keys are configured.
    fn client<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        Ok(self.state.gate.identify(authorization(request), peer)?)
    }
}

pub(crate) struct InferenceService {
    pub state: Arc<RouterState>,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// What a client of one generation reads: chunks, then a final message or a status.
pub(crate) type TokenStream = ReceiverStream<Result<GenerateResponse, Status>>;

impl RouterState {
    /// Charges `client` one request against its rate limit; a refusal counts as a request
    /// that ended RESOURCE_EXHAUSTED.
    pub(crate) fn charge(&self, client: &str) -> Result<(), Status> {
        self.gate.charge(client).map_err(|error| {
            let status = Status::from(error);
            self.metrics.request_ended(&outcome_of(status.code()));
            status
        })
    }

    /// [`Self::admit_and_start`], counting a request refused before it started.
    pub(crate) async fn start_generation(
        self: &Arc<Self>,
        request: GenerateRequest,
        header_id: Option<String>,
    ) -> Result<(RequestId, TokenStream), Status> {
        self.admit_and_start(request, header_id, Instant::now())
            .await
            .inspect_err(|status| self.metrics.request_ended(&outcome_of(status.code())))
    }

    /// Admits `request` (waiting at most the request timeout for a slot), validates and
    /// tokenizes it, and starts it. Returns its request id (the request's, else `header_id`,
    /// else one this router makes up) and the stream of its responses; dropping the stream
    /// cancels it. gRPC and HTTP calls both come through here.
    async fn admit_and_start(
        self: &Arc<Self>,
        request: GenerateRequest,
        header_id: Option<String>,
        arrived: Instant,
    ) -> Result<(RequestId, TokenStream), Status> {
        let state = Arc::clone(self);
        let timeout = state.validator.limits.request_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let request_id = header_id
            .unwrap_or_else(|| format!("r{}", state.next_request.fetch_add(1, Ordering::Relaxed)));
        let permit = state.admission.admit(timeout).await?;
        let metrics = Arc::clone(&state.metrics);
        metrics.queue_time.observe(arrived.elapsed().as_secs_f64());
        let validating = Arc::clone(&state);
        let fallback_id = RequestId(request_id);
        let valid = tokio::task::spawn_blocking(move || {
            validating.validator.validate(request, fallback_id)
        })
        .await
        .map_err(|e| RouterError::Internal(format!("validation task: {e}")))??;
        let request_id = valid.request_id.clone();
        let span = tracing::info_span!(
            "request",
            request_id = %valid.request_id,
            model = %state.validator.card.name,
            prompt_tokens = valid.prompt_ids.len(),
        );
        let (out, stream) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(
            async move {
                let _permit = permit;
                metrics.prompt_tokens.inc_by(valid.prompt_ids.len() as u64);
                let mut responder = Responder::new(
                    out.clone(),
                    valid.prompt_ids.len() as u32,
                    Arc::clone(&metrics),
                    arrived,
                );
                let result = tokio::select! {
                    // The client went away: dropping the legs cancels both workers' calls.
                    () = out.closed() => Err(RouterError::ClientGone),
                    result = tokio::time::timeout_at(
                        deadline,
                        state.cluster.generate(&valid, &mut responder),
                    ) => result.unwrap_or(Err(RouterError::Timeout {
                        seconds: timeout.as_secs_f64(),
                    })),
                };
                metrics
                    .request_duration
                    .observe(arrived.elapsed().as_secs_f64());
                match result {
                    Ok(()) => {
                        metrics.request_ended("ok");
                        tracing::debug!(tokens = responder.tokens_sent(), "request done");
                    }
                    Err(RouterError::ClientGone) => {
                        metrics.request_ended("cancelled");
                        tracing::debug!("client went away");
                    }
                    Err(error) => {
                        if error.class() == tandem_common::error_class::ErrorClass::Internal {
                            tracing::error!(%error, "request failed");
                        } else {
                            tracing::debug!(%error, "request failed");
                        }
                        let status = Status::from(error);
                        metrics.request_ended(&outcome_of(status.code()));
                        if responder.tokens_sent() > 0 {
                            let message = GenerateError {
                                code: format!("{:?}", status.code()),
                                message: status.message().to_owned(),
                            };
                            let _ = out
                                .send(Ok(GenerateResponse {
                                    kind: Some(generate_response::Kind::Error(message)),
                                }))
                                .await;
                        }
                        let _ = out.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok((request_id, ReceiverStream::new(stream)))
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let client = self.client(&request)?;
        self.state.charge(&client)?;
        let header_id = request
            .metadata()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (_, stream) = self
            .state
            .start_generation(request.into_inner(), header_id)
            .await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.client(&request)?;
        let r = request.into_inner();
        let card = &self.state.validator.card;
        if !r.model.is_empty() && r.model != card.name {
            return Err(RouterError::UnknownModel {
                asked: r.model,
                served: card.name.clone(),
            }
            .into());
        }
        let state = Arc::clone(&self.state);
        let token_ids = tokio::task::spawn_blocking(move || state.validator.card.encode(&r.text))
            .await
            .map_err(|e| RouterError::Internal(format!("tokenize task: {e}")))??;
        Ok(Response::new(TokenizeResponse { token_ids }))
    }

    async fn model_info(
        &self,
        request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        self.client(&request)?;
        let v = &self.state.validator;
        Ok(Response::new(ModelInfoResponse {
            model: v.card.name.clone(),
            vocab_size: v.card.vocab_size,
            max_position_embeddings: v.card.max_position_embeddings,
            eos_token_ids: v.card.eos_token_ids.clone(),
            max_prompt_tokens: v.limits.max_prompt_tokens,
            max_new_tokens: v.limits.max_new_tokens,
        }))
    }
}
