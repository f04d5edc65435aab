//! One worker process serving one role at a time over weights loaded once. Both roles' gRPC
//! services are always mounted; each reaches its engine thread through a [`RoleSlot`] that is
//! empty while the worker serves the other role. Switching role retires one engine thread,
//! which hands the engine back, and starts the other role's thread on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tandem_common::registry::{Registration, WorkerRecord, WorkerRole};
use tandem_engine::{Backend, EngineGroup};
use tandem_proto::internal::v1::decode_server::DecodeServer;
use tandem_proto::internal::v1::prefill_server::PrefillServer;
use tandem_proto::internal::v1::{Role, WorkerDescription, WorkerStats};
use tokio::sync::{mpsc, oneshot};
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::WorkerError;
use crate::decode::{self, DecodeService};
use crate::kv_events::KvEventHub;
use crate::prefill::{self, PrefillService};

/// What every role's engine-thread command type can carry.
pub(crate) trait RoleCommand: Send + 'static {
    type Backend: Backend;
    const ROLE: &'static str;
    fn stats(reply: oneshot::Sender<WorkerStats>) -> Self;
    fn retire(reply: oneshot::Sender<EngineGroup<Self::Backend>>) -> Self;
}

/// The way to one role's engine thread; empty while the worker serves the other role.
pub(crate) struct RoleSlot<C>(RwLock<Option<mpsc::Sender<C>>>);

impl<C: RoleCommand> RoleSlot<C> {
    fn empty() -> Self {
        Self(RwLock::new(None))
    }

    /// The engine thread's queue, or a retryable error when this role is not served now.
    pub(crate) fn sender(&self) -> Result<mpsc::Sender<C>, WorkerError> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(WorkerError::NotInRole { role: C::ROLE })
    }

    fn set(&self, sender: Option<mpsc::Sender<C>>) -> Option<mpsc::Sender<C>> {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(PoisonError::into_inner),
            sender,
        )
    }

    async fn stats(&self) -> Result<WorkerStats, WorkerError> {
        let (reply, stats) = oneshot::channel();
        // Stats wait for room rather than fail: they are how operators see a full queue.
        self.sender()?
            .send(C::stats(reply))
            .await
            .map_err(|_| WorkerError::EngineStopped)?;
        stats.await.map_err(|_| WorkerError::EngineStopped)
    }

    /// Empties the slot, so new calls are refused, and takes the engine back from its thread.
    async fn retire(&self) -> Result<EngineGroup<C::Backend>, WorkerError> {
        let sender = self
            .set(None)
            .ok_or(WorkerError::NotInRole { role: C::ROLE })?;
        let (reply, engine) = oneshot::channel();
        sender
            .send(C::retire(reply))
            .await
            .map_err(|_| WorkerError::EngineStopped)?;
        engine.await.map_err(|_| WorkerError::EngineStopped)
    }
}

/// What a role's engine thread needs besides the engine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineSettings {
    pub(crate) queue_depth: usize,
    pub(crate) kv_transfer_timeout: Duration,
    /// The decode role shares its KV cache: prefill workers may write reserved blocks.
    pub(crate) kv_shared: bool,
}

/// The worker: its description, its role's engine thread, health and registration.
pub(crate) struct Host<B: Backend> {
    pub(crate) prefill: Arc<RoleSlot<prefill::Command<B>>>,
    pub(crate) decode: Arc<RoleSlot<decode::Command<B>>>,
    settings: EngineSettings,
    description: RwLock<WorkerDescription>,
    grpc_addr: String,
    /// An SRE cordoned or is draining it: health says NOT_SERVING for both roles.
    cordoned: AtomicBool,
    health: HealthReporter,
    registration: Mutex<Option<Arc<Registration>>>,
    /// One switch at a time.
    switching: tokio::sync::Mutex<()>,
    /// Prefix-cache changes for routers; the engine keeps its cache across a role switch.
    pub(crate) kv_events: Arc<KvEventHub>,
}

impl<B: Backend> Host<B> {
    pub(crate) fn new(
        description: WorkerDescription,
        grpc_addr: String,
        settings: EngineSettings,
        health: HealthReporter,
    ) -> Self {
        let kv_events = Arc::new(KvEventHub::new(description.block_size));
        Self {
            prefill: Arc::new(RoleSlot::empty()),
            decode: Arc::new(RoleSlot::empty()),
            settings,
            description: RwLock::new(description),
            grpc_addr,
            cordoned: AtomicBool::new(false),
            health,
            registration: Mutex::new(None),
            switching: tokio::sync::Mutex::new(()),
            kv_events,
        }
    }

    pub(crate) fn description(&self) -> WorkerDescription {
        self.description
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn role(&self) -> Role {
        Role::try_from(
            self.description
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .role,
        )
        .unwrap_or(Role::Unspecified)
    }

    /// The registry record for the current role.
    pub(crate) fn record(&self) -> WorkerRecord {
        let d = self.description();
        let role = if d.role == Role::Prefill as i32 {
            WorkerRole::Prefill
        } else {
            WorkerRole::Decode
        };
        WorkerRecord::from_description(d, role, self.grpc_addr.clone())
    }

    /// Starts `role`'s engine thread on `engine` and serves that role.
    pub(crate) fn start(&self, role: Role, engine: EngineGroup<B>) -> std::io::Result<()> {
        let EngineSettings {
            queue_depth,
            kv_transfer_timeout,
            kv_shared,
        } = self.settings;
        if role == Role::Prefill {
            let (commands, commands_rx) = mpsc::channel(queue_depth);
            prefill::EngineThread::spawn(engine, commands_rx, Arc::clone(&self.kv_events))?;
            self.prefill.set(Some(commands));
        } else {
            let (commands, commands_rx) = mpsc::channel(queue_depth);
            decode::EngineThread::spawn(
                engine,
                commands_rx,
                kv_transfer_timeout,
                kv_shared,
                Arc::clone(&self.kv_events),
            )?;
            self.decode.set(Some(commands));
        }
        self.description
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .role = role as i32;
        Ok(())
    }

    pub(crate) async fn stats(&self) -> Result<WorkerStats, WorkerError> {
        if self.role() == Role::Prefill {
            self.prefill.stats().await
        } else {
            self.decode.stats().await
        }
    }

    /// Serves `target` from now on with the loaded weights. Refuses while requests run: the
    /// router drains the worker first.
    pub(crate) async fn switch_role(&self, target: Role) -> Result<WorkerDescription, WorkerError> {
        let _one_at_a_time = self.switching.lock().await;
        let from = self.role();
        if from == target {
            return Ok(self.description());
        }
        let stats = self.stats().await?;
        if stats.running_sequences + stats.waiting_sequences + stats.pending_transfers > 0 {
            let id = self.description().worker_id;
            return Err(WorkerError::Busy(format!(
                "worker `{id}` still has {} running, {} waiting and {} incoming sequences; \
                 drain it first (`tandemctl drain {id}`)",
                stats.running_sequences, stats.waiting_sequences, stats.pending_transfers
            )));
        }
        let engine = if from == Role::Prefill {
            self.prefill.retire().await?
        } else {
            self.decode.retire().await?
        };
        self.start(target, engine).map_err(|error| {
            tracing::error!(%error, "starting the engine thread for the new role");
            WorkerError::EngineStopped
        })?;
        self.refresh_health().await;
        let registration = self
            .registration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(registration) = registration {
            registration.update(&self.record()).await.map_err(|e| {
                WorkerError::Busy(format!(
                    "switched role, but updating the registry record failed: {e}"
                ))
            })?;
        }
        tracing::info!(
            from = from.as_str_name(),
            to = target.as_str_name(),
            "switched role"
        );
        Ok(self.description())
    }

    pub(crate) fn set_registration(&self, registration: Registration) {
        *self
            .registration
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(registration));
    }

    pub(crate) fn registration(&self) -> Option<Arc<Registration>> {
        self.registration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Withdraws the registry record.
    pub(crate) fn deregister(&self) {
        self.registration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Follows what SREs asked: cordoned or draining shows NOT_SERVING.
    pub(crate) async fn set_cordoned(&self, cordoned: bool) {
        if self.cordoned.swap(cordoned, Ordering::Relaxed) != cordoned {
            tracing::info!(cordoned, "desired state changed");
            self.refresh_health().await;
        }
    }

    /// NOT_SERVING for good: the worker is stopping.
    pub(crate) async fn stop_serving(&self) {
        self.cordoned.store(true, Ordering::Relaxed);
        self.refresh_health().await;
    }

    /// SERVING for the role's service unless cordoned; NOT_SERVING for the other role's.
    pub(crate) async fn refresh_health(&self) {
        let role = self.role();
        let cordoned = self.cordoned.load(Ordering::Relaxed);
        let services = [
            (
                Role::Prefill,
                <PrefillServer<PrefillService<B>> as NamedService>::NAME,
            ),
            (
                Role::Decode,
                <DecodeServer<DecodeService<B>> as NamedService>::NAME,
            ),
        ];
        for (service_role, name) in services {
            let status = if service_role == role && !cordoned {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.health.set_service_status(name, status).await;
        }
    }
}
