//! The decode engine on its own OS thread. Tokio tasks talk to it through a bounded command
//! channel; it answers each request through that request's event channel, sized so the
//! engine never waits on a slow client.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::WorkerError;
use tandem_common::ids::{KvBlockId, TransferId};
use tandem_engine::{
    Backend, BlockId, EngineError, EngineGroup, KvRows, Logprobs, SamplingParams, SeqId,
    StopCriteria, TokenEvent,
};
use tandem_proto::internal::v1::{Role, WorkerStats};
use tokio::sync::{mpsc, oneshot};

/// How often reservations waiting for KV are checked for timeouts and vanished clients when
/// nothing else wakes the thread.
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

/// One sequence to run.
#[derive(Debug)]
pub(crate) struct StartRequest {
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) stop: StopCriteria,
    /// The prompt KV comes from a prefill worker; reserve blocks and wait for it.
    pub(crate) remote_prefill: bool,
}

/// What a request's stream receives.
#[derive(Debug)]
pub(crate) enum DecodeEvent {
    Token(TokenEvent),
    Failed(WorkerError),
}

#[derive(Debug)]
pub(crate) enum Command<B: Backend> {
    Start {
        id: SeqId,
        request: StartRequest,
        events: mpsc::Sender<DecodeEvent>,
        /// The reserved blocks for a remote prefill, empty otherwise.
        reply: oneshot::Sender<Result<Vec<BlockId>, EngineError>>,
    },
    ImportLayer {
        transfer: TransferId,
        layer: usize,
        blocks: Vec<KvBlockId>,
        rows: KvRows,
    },
    FinishTransfer {
        transfer: TransferId,
        first_token: u32,
        logprobs: Logprobs,
        /// The prefill worker wrote every layer into the shared cache, sending none.
        kv_in_place: bool,
    },
    FailTransfer {
        transfer: TransferId,
        reason: String,
    },
    Stats {
        reply: oneshot::Sender<WorkerStats>,
    },
    /// Stop and hand the engine back (the worker switches role); sequences still running fail
    /// with a retryable error.
    Retire {
        reply: oneshot::Sender<EngineGroup<B>>,
    },
}

struct Tracked {
    events: mpsc::Sender<DecodeEvent>,
    /// Set while the prompt KV is on its way.
    awaiting_kv: Option<AwaitingKv>,
}

struct AwaitingKv {
    deadline: Instant,
    blocks: Vec<BlockId>,
}

impl<B: Backend> crate::host::RoleCommand for Command<B> {
    type Backend = B;
    const ROLE: &'static str = "decode";

    fn stats(reply: oneshot::Sender<WorkerStats>) -> Self {
        Self::Stats { reply }
    }

    fn retire(reply: oneshot::Sender<EngineGroup<B>>) -> Self {
        Self::Retire { reply }
    }
}

pub(crate) struct EngineThread<B: Backend> {
    engine: EngineGroup<B>,
    commands: mpsc::Receiver<Command<B>>,
    transfer_timeout: Duration,
    requests: HashMap<SeqId, Tracked>,
    generated_tokens_total: u64,
    retire: Option<oneshot::Sender<EngineGroup<B>>>,
}

impl<B: Backend> EngineThread<B> {
    pub(crate) fn spawn(
        engine: EngineGroup<B>,
        commands: mpsc::Receiver<Command<B>>,
        transfer_timeout: Duration,
        kv_events: std::sync::Arc<crate::kv_events::KvEventHub>,
    ) -> std::io::Result<()> {
        let thread = Self {
            engine,
            commands,
            transfer_timeout,
            requests: HashMap::new(),
            generated_tokens_total: 0,
            retire: None,
        };
        crate::engine_loop::spawn("decode-engine", thread, kv_events)
    }

    /// Ends every request with `error`, freeing its blocks.
    fn fail_all(&mut self, error: impl Fn() -> WorkerError) {
        let ids: Vec<SeqId> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail(id, error());
        }
    }

    fn start(
        &mut self,
        id: SeqId,
        request: StartRequest,
        events: mpsc::Sender<DecodeEvent>,
    ) -> Result<Vec<BlockId>, EngineError> {
        let StartRequest {
            prompt,
            params,
            stop,
            remote_prefill,
        } = request;
        let (blocks, awaiting_kv) = if remote_prefill {
            let blocks = self.engine.reserve(id, prompt, params, stop)?;
            let awaiting = AwaitingKv {
                deadline: Instant::now() + self.transfer_timeout,
                blocks: blocks.clone(),
            };
            (blocks, Some(awaiting))
        } else {
            self.engine.add_request(id, prompt, params, stop)?;
            (Vec::new(), None)
        };
        self.requests.insert(
            id,
            Tracked {
                events,
                awaiting_kv,
            },
        );
        Ok(blocks)
    }

    /// Checks a layer against its reservation and writes it; the error says why not.
    fn import(
        &mut self,
        transfer: TransferId,
        layer: usize,
        blocks: &[KvBlockId],
        rows: &KvRows,
    ) -> Result<(), String> {
        let id = SeqId(transfer.0);
        let Some(awaiting) = self.requests.get(&id).and_then(|t| t.awaiting_kv.as_ref()) else {
            return Err("no reservation is waiting for it".into());
        };
        let matches = blocks.len() == awaiting.blocks.len()
            && blocks.iter().zip(&awaiting.blocks).all(|(a, b)| a.0 == b.0);
        if !matches {
            return Err(format!(
                "layer {layer} names blocks {:?}, the reservation holds {:?}",
                blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
                awaiting.blocks.iter().map(|b| b.0).collect::<Vec<_>>()
            ));
        }
        self.engine
            .import_kv(id, layer, rows)
            .map_err(|e| e.to_string())
    }

    fn finish_transfer(
        &mut self,
        transfer: TransferId,
        first_token: u32,
        logprobs: Logprobs,
        kv_in_place: bool,
    ) {
        let id = SeqId(transfer.0);
        let landed = if kv_in_place {
            self.engine.mark_kv_landed(id)
        } else {
            Ok(())
        };
        match landed.and_then(|()| self.engine.admit_prefilled(id, first_token, logprobs)) {
            Ok(event) => {
                if let Some(tracked) = self.requests.get_mut(&id) {
                    tracked.awaiting_kv = None;
                }
                self.deliver(event);
            }
            Err(e) => self.fail(
                id,
                WorkerError::TransferFailed {
                    transfer,
                    reason: e.to_string(),
                },
            ),
        }
    }

    /// Ends a request with `error`, freeing its blocks.
    fn fail(&mut self, id: SeqId, error: WorkerError) {
        self.engine.abort(id);
        if let Some(tracked) = self.requests.remove(&id) {
            tracing::warn!(seq = id.0, %error, "decode request failed");
            let _ = tracked.events.try_send(DecodeEvent::Failed(error));
        }
    }

    fn deliver(&mut self, event: TokenEvent) {
        let id = event.seq;
        let finished = event.finish.is_some();
        self.generated_tokens_total += 1;
        let Some(tracked) = self.requests.get(&id) else {
            self.engine.abort(id);
            return;
        };
        // The channel holds max_tokens events, so it is never full; closed means the client
        // went away.
        if tracked.events.try_send(DecodeEvent::Token(event)).is_err() {
            self.engine.abort(id);
            self.requests.remove(&id);
        } else if finished {
            self.requests.remove(&id);
        }
    }
}

impl<B: Backend> crate::engine_loop::EngineThread for EngineThread<B> {
    type Backend = B;
    type Command = Command<B>;

    fn commands(&mut self) -> &mut mpsc::Receiver<Command<B>> {
        &mut self.commands
    }

    fn engine(&mut self) -> &mut EngineGroup<B> {
        &mut self.engine
    }

    fn has_work(&self) -> bool {
        self.engine.has_work()
    }

    fn sweep_every(&self) -> Option<Duration> {
        (!self.requests.is_empty()).then_some(SWEEP_INTERVAL)
    }

    fn take_retire(&mut self) -> Option<oneshot::Sender<EngineGroup<B>>> {
        self.retire.take()
    }

    fn into_engine(mut self) -> EngineGroup<B> {
        self.fail_all(|| WorkerError::NotInRole { role: "decode" });
        self.engine
    }

    fn handle(&mut self, command: Command<B>) {
        match command {
            Command::Start {
                id,
                request,
                events,
                reply,
            } => {
                let result = self.start(id, request, events);
                let _ = reply.send(result);
            }
            Command::ImportLayer {
                transfer,
                layer,
                blocks,
                rows,
            } => {
                if let Err(reason) = self.import(transfer, layer, &blocks, &rows) {
                    self.fail(
                        SeqId(transfer.0),
                        WorkerError::TransferFailed { transfer, reason },
                    );
                }
            }
            Command::FinishTransfer {
                transfer,
                first_token,
                logprobs,
                kv_in_place,
            } => self.finish_transfer(transfer, first_token, logprobs, kv_in_place),
            Command::FailTransfer { transfer, reason } => {
                self.fail(
                    SeqId(transfer.0),
                    WorkerError::TransferFailed { transfer, reason },
                );
            }
            Command::Stats { reply } => {
                let stats = crate::convert::worker_stats(
                    &self.engine,
                    Role::Decode,
                    self.generated_tokens_total,
                );
                let _ = reply.send(stats);
            }
            Command::Retire { reply } => self.retire = Some(reply),
        }
    }

    /// Frees the blocks of requests whose client went away or whose KV is late.
    fn sweep(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut late = Vec::new();
        for (id, tracked) in &self.requests {
            if tracked.events.is_closed() {
                gone.push(*id);
            } else if tracked
                .awaiting_kv
                .as_ref()
                .is_some_and(|a| now >= a.deadline)
            {
                late.push(*id);
            }
        }
        for id in gone {
            tracing::debug!(seq = id.0, "client went away; freeing its blocks");
            self.engine.abort(id);
            self.requests.remove(&id);
        }
        for id in late {
            let transfer = TransferId(id.0);
            self.fail(
                id,
                WorkerError::TransferTimeout {
                    transfer,
                    timeout: self.transfer_timeout,
                },
            );
        }
    }

    fn step(&mut self) {
        match self.engine.step() {
            Ok(out) => {
                for event in out.events {
                    self.deliver(event);
                }
            }
            Err(error) => {
                tracing::error!(%error, "decode step failed; failing its requests");
                self.fail_all(|| WorkerError::EngineStopped);
            }
        }
    }
}
