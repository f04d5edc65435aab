//! The wait at the top of every engine thread's loop.

use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// What an engine thread does next.
#[derive(Debug)]
pub enum Next<C> {
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
pub fn next_command<C>(
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
