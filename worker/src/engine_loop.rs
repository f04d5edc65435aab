//! The loop every role's engine thread runs: wait for commands (or step at once when there
//! is work), handle them, hand the engine back if asked to retire, sweep, step.

use std::sync::Arc;
use std::time::Duration;

use tandem_engine::{Backend, EngineGroup};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::kv_events::KvEventHub;

/// A role's engine thread state; [`spawn`] runs the shared loop over it.
pub(crate) trait EngineThread: Send + Sized + 'static {
    type Backend: Backend;
    type Command: Send + 'static;
    fn commands(&mut self) -> &mut mpsc::Receiver<Self::Command>;
    fn engine(&mut self) -> &mut EngineGroup<Self::Backend>;
    fn has_work(&self) -> bool;
    /// How often to wake for [`EngineThread::sweep`] with nothing else to do (None: never).
    fn sweep_every(&self) -> Option<Duration>;
    fn handle(&mut self, command: Self::Command);
    /// Set once a retire command was handled: where the engine goes.
    fn take_retire(&mut self) -> Option<oneshot::Sender<EngineGroup<Self::Backend>>>;
    /// Fails every request (the role is retiring) and gives up the engine.
    fn into_engine(self) -> EngineGroup<Self::Backend>;
    fn sweep(&mut self);
    fn step(&mut self);
}

/// Runs `thread` on a new OS thread named `name`, until every command sender is gone or it
/// retires; the engine's prefix-cache changes go to `kv_events`.
pub(crate) fn spawn<T: EngineThread>(
    name: &str,
    thread: T,
    kv_events: Arc<KvEventHub>,
) -> std::io::Result<()> {
    let runtime = Handle::current();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(thread, &runtime, &kv_events))
        .map(drop)
}

fn run<T: EngineThread>(mut thread: T, runtime: &Handle, kv_events: &KvEventHub) {
    loop {
        let (has_work, sweep_every) = (thread.has_work(), thread.sweep_every());
        match next_command(thread.commands(), runtime, has_work, sweep_every) {
            Next::Shutdown => return,
            Next::Command(command) => thread.handle(command),
            Next::Tick => {}
        }
        while let Ok(command) = thread.commands().try_recv() {
            thread.handle(command);
        }
        if let Some(reply) = thread.take_retire() {
            let _ = reply.send(thread.into_engine());
            return;
        }
        thread.sweep();
        if thread.has_work() {
            thread.step();
        }
        // Commands (reservations) and steps (admissions, finished prompts) change the cache.
        kv_events.publish(thread.engine().take_kv_events());
    }
}

/// What an engine thread does next.
#[derive(Debug)]
enum Next<C> {
    /// Handle this command (then drain the rest).
    Command(C),
    /// No command: step if there is work, and sweep.
    Tick,
    /// Every sender is gone: stop.
    Shutdown,
}

/// Waits for the next command. With work to step it does not wait at all; with requests to
/// sweep (for timeouts or vanished clients) it waits at most `sweep_every`; otherwise it
/// sleeps until a command comes.
fn next_command<C>(
    commands: &mut mpsc::Receiver<C>,
    runtime: &Handle,
    has_work: bool,
    sweep_every: Option<Duration>,
) -> Next<C> {
    if has_work {
        return match commands.try_recv() {
            Ok(command) => Next::Command(command),
            Err(mpsc::error::TryRecvError::Empty) => Next::Tick,
            Err(mpsc::error::TryRecvError::Disconnected) => Next::Shutdown,
        };
    }
    let Some(interval) = sweep_every else {
        return commands
            .blocking_recv()
            .map_or(Next::Shutdown, Next::Command);
    };
    match runtime.block_on(async { tokio::time::timeout(interval, commands.recv()).await }) {
        Ok(Some(command)) => Next::Command(command),
        Ok(None) => Next::Shutdown,
        Err(_elapsed) => Next::Tick,
    }
}

/// Queues `command` for an engine thread, refusing at once when `depth` commands already wait.
pub fn try_queue<C>(
    commands: &mpsc::Sender<C>,
    command: C,
    depth: usize,
) -> Result<(), crate::WorkerError> {
    commands.try_send(command).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => crate::WorkerError::QueueFull { depth },
        mpsc::error::TrySendError::Closed(_) => crate::WorkerError::EngineStopped,
    })
}
