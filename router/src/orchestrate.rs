//! One request through the cluster: the decode worker reserves blocks and answers with a
//! ticket, the prefill worker pushes the prompt's KV into them, and the decode worker's tokens
//! stream back to the client. Without prefill workers the decode worker prefills itself.

use tandem_proto::internal::v1::{
    DecodeRequest, DecodeResponse, DecodeToken, PrefillRequest, decode_response,
};
use tandem_proto::v1::{
    FinishReason, GenerateFinal, GenerateResponse, TokenChunk, Usage, generate_response,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::error::RouterError;
use crate::pool::{Lease, Pool};
use crate::validation::ValidGenerateRequest;

pub(crate) type PrefillClient = tandem_proto::internal::v1::prefill_client::PrefillClient<Channel>;
pub(crate) type DecodeClient = tandem_proto::internal::v1::decode_client::DecodeClient<Channel>;

/// The worker pools requests are spread over.
#[derive(Default)]
pub(crate) struct Cluster {
    pub(crate) prefill: Pool<PrefillClient>,
    pub(crate) decode: Pool<DecodeClient>,
}

/// Where a request's responses go, and how many tokens went there.
pub(crate) struct Responder {
    pub out: mpsc::Sender<Result<GenerateResponse, Status>>,
    pub tokens_sent: u32,
}

impl Cluster {
    /// Runs `request`, sending its chunks and final message through `responder`.
    pub(crate) async fn generate(
        &self,
        request: &ValidGenerateRequest,
        responder: &mut Responder,
    ) -> Result<(), RouterError> {
        let decode = self
            .decode
            .pick(1)
            .ok_or(RouterError::NoWorker { role: "decode" })?;
        let remote_prefill = !self.prefill.is_empty();
        let decode_error = worker_error("decode", &decode);
        let mut tokens = decode
            .worker()
            .client
            .clone()
            .generate(DecodeRequest {
                request_id: request.request_id.0.clone(),
                prompt_ids: request.prompt_ids.clone(),
                sampling: Some(request.sampling),
                max_tokens: request.max_tokens,
                stop: request.stop.clone(),
                stop_token_ids: request.stop_token_ids.clone(),
                ignore_eos: request.ignore_eos,
                remote_prefill,
            })
            .await
            .map_err(&decode_error)?
            .into_inner();
        if !remote_prefill {
            return stream_tokens(&mut tokens, request, responder, &decode_error).await;
        }
        let ticket = match next_kind(&mut tokens).await.map_err(&decode_error)? {
            Some(decode_response::Kind::Ticket(ticket)) => ticket,
            other => {
                return Err(RouterError::Internal(format!(
                    "decode worker {} answered {other:?} instead of a kv ticket",
                    decode.worker().addr
                )));
            }
        };
        let prefill = self
            .prefill
            .pick(request.prompt_ids.len())
            .ok_or(RouterError::NoWorker { role: "prefill" })?;
        let prefill_error = worker_error("prefill", &prefill);
        let mut prefill_client = prefill.worker().client.clone();
        let prefill_call = prefill_client.prefill(PrefillRequest {
            request_id: request.request_id.0.clone(),
            prompt_ids: request.prompt_ids.clone(),
            sampling: Some(request.sampling),
            ticket: Some(ticket),
        });
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

/// Maps a worker's status to a router error naming the worker.
fn worker_error<C>(role: &'static str, lease: &Lease<C>) -> impl Fn(Status) -> RouterError {
    let addr = lease.worker().addr.clone();
    move |status| RouterError::Worker {
        role,
        addr: addr.clone(),
        status,
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
        responder.tokens_sent += 1;
        responder
            .send(generate_response::Kind::Chunk(chunk))
            .await?;
        if finish != FinishReason::Unspecified {
            let done = GenerateFinal {
                finish_reason: finish as i32,
                usage: Some(Usage {
                    prompt_tokens: request.prompt_ids.len() as u32,
                    completion_tokens: responder.tokens_sent,
                }),
                request_id: request.request_id.0.clone(),
            };
            return responder.send(generate_response::Kind::Final(done)).await;
        }
    }
}

impl Responder {
    async fn send(&self, kind: generate_response::Kind) -> Result<(), RouterError> {
        self.out
            .send(Ok(GenerateResponse { kind: Some(kind) }))
            .await
            .map_err(|_| RouterError::ClientGone)
    }
}
