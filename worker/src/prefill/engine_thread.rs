//! The prefill engine on its own OS thread: prompts are batched under the token budget, and
//! each layer's KV of a finishing prompt goes to its request's channel as soon as the layer is
//! computed, so pushing it overlaps the layers still running.

use std::collections::HashMap;

use crate::WorkerError;
use tandem_engine::{Backend, EngineError, EngineGroup, KvRows, SamplingParams, SeqId, TokenEvent};
use tandem_proto::internal::v1::{Role, WorkerStats};
use tokio::sync::{mpsc, oneshot};

/// What a prefill request's handler receives, in order: every layer, then the first token.
#[derive(Debug)]
pub(crate) enum PrefillOutput {
    Layer { layer: usize, rows: KvRows },
    First(TokenEvent),
    Failed(WorkerError),
}

/// A decode worker's shared KV cache and the blocks reserved there, in position order.
#[derive(Debug)]
pub(crate) struct SharedDestination {
    pub(crate) shared_kv: Vec<u8>,
    pub(crate) blocks: Vec<u32>,
}

#[derive(Debug)]
pub(crate) enum Command<B: Backend> {
    Prefill {
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        /// Where to write the KV in place, when the decode worker shares its cache.
        shared: Option<SharedDestination>,
        /// Holds `num_layers + 2` outputs, so the engine never waits on a handler.
        outputs: mpsc::Sender<PrefillOutput>,
        /// Whether the KV is written in place (no layer outputs follow), once queued.
        reply: oneshot::Sender<Result<bool, EngineError>>,
    },
    Stats {
        reply: oneshot::Sender<WorkerStats>,
    },
    /// Stop and hand the engine back (the worker switches role); prompts still queued fail
    /// with a retryable error.
    Retire {
        reply: oneshot::Sender<EngineGroup<B>>,
    },
}

impl<B: Backend> crate::host::RoleCommand for Command<B> {
    type Backend = B;
    const ROLE: &'static str = "prefill";

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
    requests: HashMap<SeqId, mpsc::Sender<PrefillOutput>>,
    /// Prompt tokens computed since start.
    prefilled_tokens_total: u64,
    retire: Option<oneshot::Sender<EngineGroup<B>>>,
}

impl<B: Backend> EngineThread<B> {
    pub(crate) fn spawn(
        engine: EngineGroup<B>,
        commands: mpsc::Receiver<Command<B>>,
        kv_events: std::sync::Arc<crate::kv_events::KvEventHub>,
    ) -> std::io::Result<()> {
        let thread = Self {
            engine,
            commands,
            requests: HashMap::new(),
            prefilled_tokens_total: 0,
            retire: None,
        };
        crate::engine_loop::spawn("prefill-engine", thread, kv_events)
    }

    /// Queues a prompt, writing its KV into `shared` where that cache is on this GPU;
    /// returns whether it does.
    fn add(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        shared: Option<SharedDestination>,
    ) -> Result<bool, EngineError> {
        if let Some(d) = shared {
            let attempt = self.engine.add_prefill_request_to_peer(
                id,
                prompt.clone(),
                params.clone(),
                &d.shared_kv,
                &d.blocks,
            );
            match attempt {
                Ok(()) => return Ok(true),
                Err(EngineError::Unsupported(why)) => {
                    tracing::debug!(seq = id.0, %why, "kv goes through the listener");
                }
                Err(e) => return Err(e),
            }
        }
        self.engine.add_prefill_request(id, prompt, params)?;
        Ok(false)
    }

    /// Ends every request with `error`, freeing its blocks.
    fn fail_all(&mut self, error: impl Fn() -> WorkerError) {
        for (id, outputs) in self.requests.drain() {
            self.engine.abort(id);
            let _ = outputs.try_send(PrefillOutput::Failed(error()));
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

    fn sweep_every(&self) -> Option<std::time::Duration> {
        // Idle means no request to sweep: abandoned ones are dropped while stepping.
        None
    }

    fn take_retire(&mut self) -> Option<oneshot::Sender<EngineGroup<B>>> {
        self.retire.take()
    }

    fn into_engine(mut self) -> EngineGroup<B> {
        self.fail_all(|| WorkerError::NotInRole { role: "prefill" });
        self.engine
    }

    fn handle(&mut self, command: Command<B>) {
        match command {
            Command::Prefill {
                id,
                prompt,
                params,
                shared,
                outputs,
                reply,
            } => {
                let result = self.add(id, prompt, params, shared);
                if result.is_ok() {
                    self.requests.insert(id, outputs);
                }
                let _ = reply.send(result);
            }
            Command::Stats { reply } => {
                let stats = crate::convert::worker_stats(
                    &self.engine,
                    Role::Prefill,
                    self.prefilled_tokens_total,
                );
                let _ = reply.send(stats);
            }
            Command::Retire { reply } => self.retire = Some(reply),
        }
    }

    /// Aborts prompts whose caller went away (the router cancelled the call).
    fn sweep(&mut self) {
        let gone: Vec<SeqId> = self
            .requests
            .iter()
            .filter(|(_, outputs)| outputs.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            tracing::debug!(seq = id.0, "prefill caller went away; aborting");
            self.engine.abort(id);
            self.requests.remove(&id);
        }
    }

    fn step(&mut self) {
        let requests = &self.requests;
        let result = self.engine.step_exporting(&mut |kv| {
            if let Some(outputs) = requests.get(&kv.seq) {
                let _ = outputs.try_send(PrefillOutput::Layer {
                    layer: kv.layer,
                    rows: kv.rows.clone(),
                });
            }
        });
        match result {
            Ok(out) => {
                self.prefilled_tokens_total += out.prefill_tokens as u64;
                for event in out.events {
                    if let Some(outputs) = self.requests.remove(&event.seq) {
                        let _ = outputs.try_send(PrefillOutput::First(event));
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "prefill step failed; failing its requests");
                self.fail_all(|| WorkerError::EngineStopped);
            }
        }
    }
}
