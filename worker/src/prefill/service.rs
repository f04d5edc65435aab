//! The prefill worker's gRPC services: a prefill call queues its prompt, then pushes each
//! layer to the ticket's decode worker as the engine thread hands it over, then the first
//! token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tandem_common::ids::{KvBlockId, TransferId};
use tandem_engine::{Backend, SeqId};
use tandem_kv_transfer::{DoneFrame, Frame, KvShape, LayerFrame, TcpKvSender};
use tandem_proto::internal::v1::prefill_server::Prefill;
use tandem_proto::internal::v1::{PrefillRequest, PrefillResponse};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::engine_thread::{Command, PrefillOutput, SharedDestination};
use crate::WorkerError;
use crate::engine_loop::try_queue;
use crate::host::RoleSlot;
use crate::metrics::WorkerMetrics;
use crate::sampling_params;

pub(crate) struct PrefillService<B: Backend> {
    pub(crate) commands: std::sync::Arc<RoleSlot<Command<B>>>,
    pub(crate) sender: TcpKvSender,
    pub(crate) next_id: AtomicU64,
    pub(crate) queue_depth: usize,
    pub(crate) num_layers: usize,
    pub(crate) kv_heads: u32,
    pub(crate) head_dim: u32,
    pub(crate) metrics: Arc<WorkerMetrics>,
}

#[tonic::async_trait]
impl<B: Backend> Prefill for PrefillService<B> {
    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        let arrived = Instant::now();
        let r = request.into_inner();
        let ticket = r
            .ticket
            .ok_or_else(|| WorkerError::InvalidRequest("ticket is missing".into()))?;
        let endpoint: SocketAddr = ticket.endpoint.parse().map_err(|_| {
            WorkerError::InvalidRequest(format!(
                "ticket endpoint `{}` is not host:port",
                ticket.endpoint
            ))
        })?;
        if ticket.num_tokens as usize != r.prompt_ids.len() {
            return Err(WorkerError::InvalidRequest(format!(
                "ticket is for {} tokens, the prompt has {}",
                ticket.num_tokens,
                r.prompt_ids.len()
            ))
            .into());
        }
        let transfer = TransferId(ticket.transfer_id);
        let blocks: Vec<KvBlockId> = ticket.block_ids.iter().copied().map(KvBlockId).collect();
        let shape = KvShape {
            num_tokens: ticket.num_tokens,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        let (outputs, mut outputs_rx) = mpsc::channel(self.num_layers + 2);
        let (reply, queued) = oneshot::channel();
        let shared = (!ticket.shared_kv.is_empty()).then_some(SharedDestination {
            shared_kv: ticket.shared_kv,
            blocks: ticket.block_ids,
        });
        let command = Command::Prefill {
            id: SeqId(self.next_id.fetch_add(1, Ordering::Relaxed)),
            prompt: r.prompt_ids,
            params: sampling_params(&r.sampling.unwrap_or_default()),
            shared,
            outputs,
            reply,
        };
        try_queue(&self.commands.sender()?, command, self.queue_depth)?;
        let kv_in_place = queued
            .await
            .map_err(|_| WorkerError::EngineStopped)?
            .map_err(WorkerError::from)?;
        let mut first_layer_seconds = None;
        let mut sending = Duration::ZERO;
        // Dropping `outputs_rx` (the router cancelled) makes the engine abort the prompt.
        while let Some(output) = outputs_rx.recv().await {
            match output {
                PrefillOutput::Layer { layer, rows } => {
                    first_layer_seconds.get_or_insert_with(|| arrived.elapsed().as_secs_f64());
                    let frame = LayerFrame::from_f32(
                        transfer,
                        layer as u32,
                        shape,
                        blocks.clone(),
                        &rows.k,
                        &rows.v,
                    );
                    let bytes = frame.payload.len();
                    let send_started = Instant::now();
                    self.sender
                        .send(endpoint, Frame::Layer(frame))
                        .await
                        .map_err(WorkerError::from)?;
                    sending += send_started.elapsed();
                    self.metrics.kv_transfer_bytes.inc_by(bytes as u64);
                }
                PrefillOutput::First(event) => {
                    let done = DoneFrame {
                        transfer,
                        first_token: event.token,
                        logprob: event.logprobs.chosen,
                        top: event
                            .logprobs
                            .top
                            .iter()
                            .map(|t| (t.token, t.logprob))
                            .collect(),
                        kv_in_place,
                    };
                    self.sender
                        .send(endpoint, Frame::Done(done))
                        .await
                        .map_err(WorkerError::from)?;
                    tracing::debug!(request_id = %r.request_id, %transfer, kv_in_place, "kv pushed");
                    if kv_in_place {
                        // K and V of every layer, bf16.
                        let per_token =
                            2 * self.num_layers * (self.kv_heads * self.head_dim) as usize * 2;
                        self.metrics
                            .kv_in_place_bytes
                            .inc_by((shape.num_tokens as usize * per_token) as u64);
                    }
                    self.metrics
                        .kv_transfer_duration
                        .observe(sending.as_secs_f64());
                    self.metrics
                        .prefill_duration
                        .observe(arrived.elapsed().as_secs_f64());
                    return Ok(Response::new(PrefillResponse {
                        first_token: event.token,
                        first_layer_seconds: first_layer_seconds.unwrap_or_default(),
                        total_seconds: arrived.elapsed().as_secs_f64(),
                    }));
                }
                PrefillOutput::Failed(e) => return Err(e.into()),
            }
        }
        Err(WorkerError::EngineStopped.into())
    }
}
