//! The decode worker's gRPC services and the task that turns arriving KV frames into engine
//! commands.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tandem_engine::{Backend, KvRows, Logprobs, SeqId, StopCriteria, TopLogprob};
use tandem_kv_transfer::{Dtype, Frame, InvalidFrame, Received};
use tandem_proto::internal::v1::decode_server::Decode;
use tandem_proto::internal::v1::{
    DecodeRequest, DecodeResponse, DecodeToken, KvTicket, decode_response,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::engine_thread::{Command, DecodeEvent, StartRequest};
use crate::engine_loop::try_queue;
use crate::host::RoleSlot;
use crate::{WorkerError, finish_reason, sampling_params, token_logprob};

/// Events beyond `max_tokens` a request's channel holds (the failure that may end it).
const EVENT_SLACK: usize = 2;

pub(crate) struct DecodeService<B: Backend> {
    pub(crate) commands: Arc<RoleSlot<Command<B>>>,
    pub(crate) kv_endpoint: SocketAddr,
    /// This worker's KV cache as a prefill worker on the same GPU opens it (empty: none).
    pub(crate) shared_kv: Vec<u8>,
    pub(crate) next_id: AtomicU64,
    pub(crate) queue_depth: usize,
}

type DecodeStream = Pin<Box<dyn Stream<Item = Result<DecodeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> Decode for DecodeService<B> {
    type GenerateStream = DecodeStream;

    async fn generate(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<DecodeStream>, Status> {
        let r = request.into_inner();
        let id = SeqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let prompt_len = r.prompt_ids.len();
        let request = StartRequest {
            params: sampling_params(&r.sampling.unwrap_or_default()),
            stop: StopCriteria {
                max_new_tokens: r.max_tokens as usize,
                stop_token_ids: r.stop_token_ids,
                stop_strings: r.stop,
                ignore_eos: r.ignore_eos,
            },
            prompt: r.prompt_ids,
            remote_prefill: r.remote_prefill,
        };
        let (events, events_rx) = mpsc::channel(r.max_tokens as usize + EVENT_SLACK);
        let (reply, blocks) = oneshot::channel();
        let command = Command::Start {
            id,
            request,
            events,
            reply,
        };
        try_queue(&self.commands.sender()?, command, self.queue_depth)?;
        let blocks = blocks
            .await
            .map_err(|_| WorkerError::EngineStopped)?
            .map_err(WorkerError::from)?;
        tracing::debug!(request_id = %r.request_id, seq = id.0, "decode request started");
        let ticket = r.remote_prefill.then(|| {
            Ok(DecodeResponse {
                kind: Some(decode_response::Kind::Ticket(KvTicket {
                    transfer_id: id.0,
                    endpoint: self.kv_endpoint.to_string(),
                    block_ids: blocks.iter().map(|b| b.0).collect(),
                    num_tokens: prompt_len as u32,
                    shared_kv: self.shared_kv.clone(),
                })),
            })
        });
        let tokens = ReceiverStream::new(events_rx).map(|event| match event {
            DecodeEvent::Token(t) => Ok(DecodeResponse {
                kind: Some(decode_response::Kind::Token(DecodeToken {
                    token_id: t.token,
                    text: t.text,
                    logprob: Some(token_logprob(&t.logprobs)),
                    finish_reason: finish_reason(t.finish) as i32,
                })),
            }),
            DecodeEvent::Failed(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(
            tokio_stream::iter(ticket).chain(tokens),
        )))
    }
}

/// Shape every arriving layer must have, and whether KV may be written in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvLayout {
    pub(crate) kv_heads: u32,
    pub(crate) head_dim: u32,
    /// This worker shares its cache, so a transfer may end with no layer frame.
    pub(crate) shares_kv: bool,
}

/// Checks each arriving frame against the model's KV layout and hands it to the decode
/// engine thread; waiting for room in the command queue slows the sender through TCP. Frames
/// arriving while the worker serves another role are dropped (their requests already failed).
pub(crate) async fn run_kv_intake<B: Backend>(
    mut frames: mpsc::Receiver<Received>,
    commands: Arc<RoleSlot<Command<B>>>,
    layout: KvLayout,
) {
    while let Some(received) = frames.recv().await {
        let command = match received {
            Ok(Frame::Layer(f)) => {
                let rows = (f.dtype == Dtype::F32
                    && f.shape.kv_heads == layout.kv_heads
                    && f.shape.head_dim == layout.head_dim)
                    .then(|| f.to_f32())
                    .flatten();
                match rows {
                    Some((k, v)) => Command::ImportLayer {
                        transfer: f.transfer,
                        layer: f.layer as usize,
                        blocks: f.blocks,
                        rows: KvRows { k, v },
                    },
                    None => Command::FailTransfer {
                        transfer: f.transfer,
                        reason: format!(
                            "layer {} is {:?} with {} kv heads of {}, expected F32 with {} of {}",
                            f.layer,
                            f.dtype,
                            f.shape.kv_heads,
                            f.shape.head_dim,
                            layout.kv_heads,
                            layout.head_dim
                        ),
                    },
                }
            }
            Ok(Frame::Done(d)) if d.kv_in_place && !layout.shares_kv => Command::FailTransfer {
                transfer: d.transfer,
                reason: "the kv was written in place, but this worker shares no cache".into(),
            },
            Ok(Frame::Done(d)) => Command::FinishTransfer {
                transfer: d.transfer,
                kv_in_place: d.kv_in_place,
                first_token: d.first_token,
                logprobs: Logprobs {
                    chosen: d.logprob,
                    top: d
                        .top
                        .iter()
                        .map(|&(token, logprob)| TopLogprob { token, logprob })
                        .collect(),
                },
            },
            Err(InvalidFrame {
                transfer: Some(transfer),
                reason,
            }) => Command::FailTransfer { transfer, reason },
            Err(InvalidFrame {
                transfer: None,
                reason,
            }) => {
                tracing::warn!(%reason, "dropping a kv frame that names no transfer");
                continue;
            }
        };
        match commands.sender() {
            Ok(engine) => {
                // A closed channel means the engine is retiring: the request fails anyway.
                let _ = engine.send(command).await;
            }
            Err(error) => tracing::warn!(%error, "dropping a kv frame"),
        }
    }
}
