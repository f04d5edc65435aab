//! The prefill engine on its own OS thread: prompts are batched under the token budget, and
//! each layer's KV of a finishing prompt goes to its request's channel as soon as the layer is
//! computed, so pushing it overlaps the layers still running.

use std::collections::HashMap;

use tandem_engine::{CpuBackend, Engine, EngineError, KvRows, SamplingParams, SeqId, TokenEvent};
use tandem_proto::internal::v1::{Role, WorkerStats};
use tandem_worker::WorkerError;
use tandem_worker::engine_loop::{Next, next_command};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

/// What a prefill request's handler receives, in order: every layer, then the first token.
#[derive(Debug)]
pub(crate) enum PrefillOutput {
    Layer { layer: usize, rows: KvRows },
    First(TokenEvent),
    Failed(WorkerError),
}

#[derive(Debug)]
pub(crate) enum Command {
    Prefill {
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        /// Holds `num_layers + 2` outputs, so the engine never waits on a handler.
        outputs: mpsc::Sender<PrefillOutput>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Stats {
        reply: oneshot::Sender<WorkerStats>,
    },
}

pub(crate) struct EngineThread {
    engine: Engine<CpuBackend>,
    commands: mpsc::Receiver<Command>,
    runtime: Handle,
    requests: HashMap<SeqId, mpsc::Sender<PrefillOutput>>,
    /// Prompt tokens computed since start.
    prefilled_tokens_total: u64,
}

impl EngineThread {
    pub(crate) fn spawn(
        engine: Engine<CpuBackend>,
        commands: mpsc::Receiver<Command>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let runtime = Handle::current();
        std::thread::Builder::new()
            .name("prefill-engine".into())
            .spawn(move || {
                Self {
                    engine,
                    commands,
                    runtime,
                    requests: HashMap::new(),
                    prefilled_tokens_total: 0,
                }
                .run();
            })
    }

    fn run(mut self) {
        loop {
            match next_command(
                &mut self.commands,
                &self.runtime,
                self.engine.has_work(),
                // Idle means no request to sweep: abandoned ones are dropped while stepping.
                None,
            ) {
                Next::Shutdown => return,
                Next::Command(command) => self.handle(command),
                Next::Tick => {}
            }
            while let Ok(command) = self.commands.try_recv() {
                self.handle(command);
            }
            self.drop_abandoned();
            if self.engine.has_work() {
                self.step();
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Prefill {
                id,
                prompt,
                params,
                outputs,
                reply,
            } => {
                let result = self.engine.add_prefill_request(id, prompt, params);
                if result.is_ok() {
                    self.requests.insert(id, outputs);
                }
                let _ = reply.send(result);
            }
            Command::Stats { reply } => {
                let _ = reply.send(WorkerStats {
                    role: Role::Prefill as i32,
                    running_sequences: self.engine.num_running() as u32,
                    waiting_sequences: self.engine.num_waiting() as u32,
                    queued_prefill_tokens: self.engine.queued_prefill_tokens() as u64,
                    kv_blocks_used: self.engine.used_blocks() as u32,
                    kv_blocks_total: (self.engine.used_blocks() + self.engine.free_blocks()) as u32,
                    pending_transfers: 0,
                    tokens_total: self.prefilled_tokens_total,
                });
            }
        }
    }

    /// Aborts prompts whose caller went away (the router cancelled the call).
    fn drop_abandoned(&mut self) {
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
                for (id, outputs) in self.requests.drain() {
                    self.engine.abort(id);
                    let _ = outputs.try_send(PrefillOutput::Failed(WorkerError::EngineStopped));
                }
            }
        }
    }
}
