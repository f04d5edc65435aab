//! One request through the cluster: the decode worker reserves blocks and answers with a
//! ticket, the prefill worker pushes the prompt's KV into them, and the decode worker's tokens
//! stream back to the client. Without a prefill worker taking requests the decode worker
//! prefills itself.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_proto::internal::v1::{
    DecodeRequest, DecodeResponse, DecodeToken, PrefillRequest, decode_response,
};
use tandem_proto::v1::{
    FinishReason, GenerateFinal, GenerateResponse, TokenChunk, Usage, generate_response,
};

use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use tandem_common::telemetry::traced;

use crate::error::RouterError;
use crate::metrics::RouterMetrics;
use crate::pool::{Lease, Pool};
use crate::prefix_index::{PrefixIndex, PromptHashes};
use crate::validation::ValidGenerateRequest;

pub(crate) type PrefillClient = tandem_proto::internal::v1::prefill_client::PrefillClient<Channel>;
pub(crate) type DecodeClient = tandem_proto::internal::v1::decode_client::DecodeClient<Channel>;

/// The worker pools requests are spread over, and how failures of their workers are handled.
#[derive(Default)]
pub(crate) struct Cluster {
    pub(crate) prefill: Pool<PrefillClient>,
    pub(crate) decode: Pool<DecodeClient>,
    /// How long a worker that failed a call gets no new request.
    pub(crate) hold_back: Duration,
    /// Attempts per request (on other workers) while no token has reached the client.
    pub(crate) max_attempts: u32,
    /// Moves of one stream to another worker pair after tokens reached the client.
    pub(crate) migration_limit: u32,
    /// How a prefill worker is chosen.
    pub(crate) routing: Routing,
    /// What each prefill worker caches, for KV-aware routing.
    pub(crate) prefix_index: PrefixIndex,
    /// Prompts with fewer tokens than this to compute are prefilled by the decode worker.
    pub(crate) local_prefill_below: usize,
}

/// How the router picks a prefill worker (`--routing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// The worker with the least prompt tokens to compute: the ones not in its prefix
    /// cache, plus the ones it is already computing for this router.
    #[default]
    KvAware,
    /// Each worker in turn, whatever it caches or runs.
    RoundRobin,
}

/// Where a request's responses go, and the tokens that went there.
pub(crate) struct Responder {
    out: mpsc::Sender<Result<GenerateResponse, Status>>,
    /// The client's prompt length, for the usage of the final message.
    prompt_tokens: u32,
    sent: Vec<u32>,
    metrics: Arc<RouterMetrics>,
    arrived: Instant,
    last_sent: Option<Instant>,
}

impl Cluster {
    /// Prompt tokens `worker` would compute for `prompt`: those not in its prefix cache.
    pub(crate) fn uncached_tokens<C>(
        &self,
        worker: &crate::pool::Worker<C>,
        prompt: &PromptHashes<'_>,
    ) -> usize {
        prompt.prompt_len() - self.prefix_index.cached_tokens(&worker.id, prompt)
    }

    /// The prefill worker for `prompt` (None: the decode worker prefills it itself).
    fn pick_prefill(&self, prompt: &[u32]) -> Option<Lease<PrefillClient>> {
        // Hashed once, however many workers are scored (the hashes are not Send, so this
        // stays out of the async code).
        let hashes = PromptHashes::new(prompt);
        let prefill = match self.routing {
            Routing::KvAware => self.prefill.pick_by(|w| self.uncached_tokens(w, &hashes)),
            Routing::RoundRobin => self.prefill.pick_in_turn(prompt.len()),
        };
        // A prompt with little left to compute is cheaper to prefill on the decode worker
        // than to move as KV (when the operator allows it).
        let prefill = prefill.filter(|lease| {
            self.uncached_tokens(lease.worker(), &hashes) >= self.local_prefill_below
        });
        if let (Routing::KvAware, Some(lease)) = (self.routing, &prefill) {
            self.prefix_index.note_routed(&lease.worker().id, &hashes);
        }
        prefill
    }

    /// Runs `request`, sending its chunks and final message through `responder`. A worker
    /// failure before the first token is retried on other workers (the failed one is held
    /// back). After tokens reached the client, the stream migrates: the prompt and the tokens
    /// already sent are prefilled on another pair, which continues the same stream (at most
    /// `migration_limit` times). Greedy streams continue exactly; a stop string spanning the
    /// move is not seen, since the new decode worker sees only the text after it.
    pub(crate) async fn generate(
        &self,
        request: &ValidGenerateRequest,
        responder: &mut Responder,
    ) -> Result<(), RouterError> {
        let mut attempt = 1;
        let mut migrations = 0;
        loop {
            let result = if responder.sent.is_empty() {
                self.attempt(request, responder).await
            } else {
                self.attempt(&continuation(request, &responder.sent), responder)
                    .await
            };
            match result {
                Err(error)
                    if error.is_worker_failure()
                        && responder.sent.is_empty()
                        && attempt < self.max_attempts =>
                {
                    tracing::warn!(%error, attempt, "worker failed; retrying on another");
                    attempt += 1;
                }
                Err(error)
                    if error.is_worker_failure()
                        && !responder.sent.is_empty()
                        && migrations < self.migration_limit =>
                {
                    migrations += 1;
                    tracing::warn!(
                        %error,
                        tokens_sent = responder.sent.len(),
                        migrations,
                        "worker failed mid-stream; migrating the stream to another pair"
                    );
                    if responder.sent.len() as u32 >= request.max_tokens {
                        return responder.finish(FinishReason::Length, request).await;
                    }
                }
                result => return result,
            }
        }
    }

    async fn attempt(
        &self,
        request: &ValidGenerateRequest,
        responder: &mut Responder,
    ) -> Result<(), RouterError> {
        // Without a prefill worker taking requests (none, or all cordoned or moving), the
        // decode worker prefills the prompt itself.
        let prefill = self.pick_prefill(&request.prompt_ids);
        let decode = self
            .decode
            .pick(1)
            .ok_or(RouterError::NoWorker { role: "decode" })?;
        let remote_prefill = prefill.is_some();
        let decode_error = worker_error("decode", &decode, self.hold_back);
        let mut tokens = decode
            .worker()
            .client
            .clone()
            .generate(traced(DecodeRequest {
                request_id: request.request_id.0.clone(),
                prompt_ids: request.prompt_ids.clone(),
                sampling: Some(request.sampling),
                max_tokens: request.max_tokens,
                stop: request.stop.clone(),
                stop_token_ids: request.stop_token_ids.clone(),
                ignore_eos: request.ignore_eos,
                remote_prefill,
            }))
            .await
            .map_err(&decode_error)?
            .into_inner();
        let Some(prefill) = prefill else {
            return stream_tokens(&mut tokens, request, responder, &decode_error).await;
        };
        let ticket = match next_kind(&mut tokens).await.map_err(&decode_error)? {
            Some(decode_response::Kind::Ticket(ticket)) => ticket,
            other => {
                return Err(RouterError::Internal(format!(
                    "decode worker {} answered {other:?} instead of a kv ticket",
                    decode.worker().addr
                )));
            }
        };
        let prefill_error = worker_error("prefill", &prefill, self.hold_back);
        let mut prefill_client = prefill.worker().client.clone();
        let prefill_call = prefill_client.prefill(traced(PrefillRequest {
            request_id: request.request_id.0.clone(),
            prompt_ids: request.prompt_ids.clone(),
            sampling: Some(request.sampling),
            ticket: Some(ticket),
        }));
        tokio::pin!(prefill_call);
        let decoding = stream_tokens(&mut tokens, request, responder, &decode_error);
        tokio::pin!(decoding);
        // The decode stream usually ends last; a failed prefill ends both (dropping the decode
        // stream frees the reservation).
        tokio::select! {
            prefilled = &mut prefill_call => {
                prefilled.map_err(&prefill_error)?;
                decoding.await
            }
            decoded = &mut decoding => decoded,
        }
    }
}

/// Maps a worker's status to a router error naming the worker, holding the worker back for
/// `hold_back` when the worker itself failed.
fn worker_error<C: Send + Sync + 'static>(
    role: &'static str,
    lease: &Lease<C>,
    hold_back: Duration,
) -> impl Fn(Status) -> RouterError {
    let worker = lease.shared();
    move |status| {
        let error = RouterError::Worker {
            role,
            addr: worker.addr.clone(),
            status,
        };
        if error.is_worker_failure() {
            worker.hold_back(hold_back);
        }
        error
    }
}

/// The next message of a decode stream, `None` at its end.
async fn next_kind(
    stream: &mut Streaming<DecodeResponse>,
) -> Result<Option<decode_response::Kind>, Status> {
    Ok(stream.message().await?.and_then(|m| m.kind))
}

/// Forwards decode tokens to the client until the finishing one, then the final message.
async fn stream_tokens(
    tokens: &mut Streaming<DecodeResponse>,
    request: &ValidGenerateRequest,
    responder: &mut Responder,
    decode_error: &impl Fn(Status) -> RouterError,
) -> Result<(), RouterError> {
    loop {
        let token: DecodeToken = match next_kind(tokens).await.map_err(decode_error)? {
            Some(decode_response::Kind::Token(token)) => token,
            Some(decode_response::Kind::Ticket(_)) => {
                return Err(RouterError::Internal(
                    "decode worker sent a second kv ticket".into(),
                ));
            }
            None => {
                return Err(RouterError::Internal(
                    "decode worker ended the stream before the last token".into(),
                ));
            }
        };
        let finish = FinishReason::try_from(token.finish_reason).unwrap_or_default();
        let chunk = TokenChunk {
            token_ids: vec![token.token_id],
            text: token.text,
            logprobs: if request.logprobs {
                token.logprob.into_iter().collect()
            } else {
                Vec::new()
            },
        };
        responder.send_token(token.token_id, chunk).await?;
        if finish != FinishReason::Unspecified {
            return responder.finish(finish, request).await;
        }
    }
}

/// `request` continued after `sent`: those tokens join the prompt, and fewer remain to
/// generate.
fn continuation(request: &ValidGenerateRequest, sent: &[u32]) -> ValidGenerateRequest {
    let mut next = request.clone();
    next.prompt_ids.extend_from_slice(sent);
    next.max_tokens = request.max_tokens.saturating_sub(sent.len() as u32);
    next
}

impl Responder {
    /// Streams to `out` for a request that arrived at `arrived`, recording token timings.
    pub(crate) fn new(
        out: mpsc::Sender<Result<GenerateResponse, Status>>,
        prompt_tokens: u32,
        metrics: Arc<RouterMetrics>,
        arrived: Instant,
    ) -> Self {
        Self {
            out,
            prompt_tokens,
            sent: Vec::new(),
            metrics,
            arrived,
            last_sent: None,
        }
    }

    /// Sends one token's chunk: the first one's time is the time to first token, later
    /// ones' gaps the inter-token latency.
    async fn send_token(&mut self, token_id: u32, chunk: TokenChunk) -> Result<(), RouterError> {
        self.send(generate_response::Kind::Chunk(chunk)).await?;
        let now = Instant::now();
        let since = self.last_sent.replace(now);
        let (histogram, from) = match since {
            None => (&self.metrics.time_to_first_token, self.arrived),
            Some(previous) => (&self.metrics.inter_token_latency, previous),
        };
        histogram.observe(now.duration_since(from).as_secs_f64());
        self.metrics.output_tokens.inc();
        self.sent.push(token_id);
        Ok(())
    }

    pub(crate) fn tokens_sent(&self) -> usize {
        self.sent.len()
    }

    /// The final message: finish reason and usage over the whole stream.
    async fn finish(
        &self,
        finish: FinishReason,
        request: &ValidGenerateRequest,
    ) -> Result<(), RouterError> {
        let done = GenerateFinal {
            finish_reason: finish as i32,
            usage: Some(Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.sent.len() as u32,
            }),
            request_id: request.request_id.0.clone(),
        };
        self.send(generate_response::Kind::Final(done)).await
    }

    async fn send(&self, kind: generate_response::Kind) -> Result<(), RouterError> {
        self.out
            .send(Ok(GenerateResponse { kind: Some(kind) }))
            .await
            .map_err(|_| RouterError::ClientGone)
    }
}
