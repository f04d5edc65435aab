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
/// How long the blocks of a reservation that ended without its KV stay out of use when a
/// prefill worker on this GPU may be writing them in place: its call was cancelled, and it
/// stops before its next engine step, far sooner than this.
const IN_PLACE_GRACE: Duration = Duration::from_secs(10);

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
    /// This worker shares its cache, so reserved blocks may be written in place.
    kv_shared: bool,
    requests: HashMap<SeqId, Tracked>,
    /// Reservations that ended without their KV, freed once the time comes (see
    /// [`IN_PLACE_GRACE`]).
    quarantined: Vec<(Instant, SeqId)>,
    generated_tokens_total: u64,
    retire: Option<oneshot::Sender<EngineGroup<B>>>,
}

impl<B: Backend> EngineThread<B> {
    pub(crate) fn spawn(
        engine: EngineGroup<B>,
        commands: mpsc::Receiver<Command<B>>,
        transfer_timeout: Duration,
        kv_shared: bool,
        kv_events: std::sync::Arc<crate::kv_events::KvEventHub>,
    ) -> std::io::Result<()> {
        let thread = Self {
            engine,
            commands,
            transfer_timeout,
            kv_shared,
            requests: HashMap::new(),
            quarantined: Vec::new(),
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
        let tracked = self.requests.remove(&id);
        self.release(id, tracked.as_ref());
        if let Some(tracked) = tracked {
            tracing::warn!(seq = id.0, %error, "decode request failed");
            let _ = tracked.events.try_send(DecodeEvent::Failed(error));
        }
    }

    /// Frees an ended request's blocks, or, when a prefill worker on this GPU may still be
    /// writing them in place, sets them aside until it surely has stopped: reused sooner, they
    /// could be overwritten under another sequence.
    fn release(&mut self, id: SeqId, tracked: Option<&Tracked>) {
        if self.kv_shared && tracked.is_some_and(|t| t.awaiting_kv.is_some()) {
            self.quarantined.push((Instant::now() + IN_PLACE_GRACE, id));
        } else {
            self.engine.abort(id);
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
        (!self.requests.is_empty() || !self.quarantined.is_empty()).then_some(SWEEP_INTERVAL)
    }

    fn take_retire(&mut self) -> Option<oneshot::Sender<EngineGroup<B>>> {
        self.retire.take()
    }

    fn into_engine(mut self) -> EngineGroup<B> {
        self.fail_all(|| WorkerError::NotInRole { role: "decode" });
        // The role switch drained the prefill legs first; nothing writes these any more.
        for (_, id) in std::mem::take(&mut self.quarantined) {
            self.engine.abort(id);
        }
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
            let tracked = self.requests.remove(&id);
            self.release(id, tracked.as_ref());
        }
        let (due, waiting) = std::mem::take(&mut self.quarantined)
            .into_iter()
            .partition(|&(at, _)| now >= at);
        self.quarantined = waiting;
        for (_, id) in due {
            self.engine.abort(id);
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tandem_engine::{CpuBackend, Engine, EngineConfig, Model};

    use super::*;
    use crate::engine_loop::EngineThread as _;

    fn thread(kv_shared: bool) -> EngineThread<CpuBackend> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-moe-f32");
        let model = Model::load(&dir, CpuBackend, &mut |_| {}).expect("fixture loads");
        let engine = Engine::new(model, None, EngineConfig::default()).expect("engine");
        let (_commands, commands_rx) = mpsc::channel(4);
        EngineThread {
            engine: EngineGroup::single(engine),
            commands: commands_rx,
            transfer_timeout: Duration::from_secs(30),
            kv_shared,
            requests: HashMap::new(),
            quarantined: Vec::new(),
            generated_tokens_total: 0,
            retire: None,
        }
    }

    /// Reserves blocks for a remote prefill, then fails its transfer.
    fn reserve_and_fail(thread: &mut EngineThread<CpuBackend>) -> mpsc::Receiver<DecodeEvent> {
        let (events, events_rx) = mpsc::channel(8);
        let request = StartRequest {
            prompt: vec![5; 40],
            params: SamplingParams::greedy(),
            stop: StopCriteria::max_new_tokens(4),
            remote_prefill: true,
        };
        thread.start(SeqId(1), request, events).expect("reserved");
        assert!(thread.engine.used_blocks() > 0);
        thread.handle(Command::FailTransfer {
            transfer: TransferId(1),
            reason: "test".into(),
        });
        events_rx
    }

    #[test]
    fn blocks_a_peer_may_still_write_stay_out_of_use_for_the_grace() {
        let mut thread = thread(true);
        let mut events = reserve_and_fail(&mut thread);
        assert!(matches!(events.try_recv(), Ok(DecodeEvent::Failed(_))));
        thread.sweep();
        assert!(
            thread.engine.used_blocks() > 0,
            "freed before the grace ended"
        );
        assert_eq!(thread.sweep_every(), Some(SWEEP_INTERVAL));
        thread.quarantined[0].0 = Instant::now();
        thread.sweep();
        assert_eq!(thread.engine.used_blocks(), 0);
        assert_eq!(thread.sweep_every(), None);
    }

    #[test]
    fn without_a_shared_cache_blocks_are_freed_at_once() {
        let mut thread = thread(false);
        let mut events = reserve_and_fail(&mut thread);
        assert!(matches!(events.try_recv(), Ok(DecodeEvent::Failed(_))));
        assert_eq!(thread.engine.used_blocks(), 0);
    }
}
