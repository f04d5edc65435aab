//! Where workers announce themselves and routers find them: etcd for fleets, an embedded
//! in-process registry for one machine. Both publish [`WorkerRecord`]s and what SREs asked of
//! each worker ([`DesiredState`]), and hand watchers a full snapshot after every change.

mod embedded;
mod etcd;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use embedded::EmbeddedRegistry;
pub use etcd::EtcdRegistry;

/// A worker's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRole {
    Prefill,
    Decode,
}

/// What a worker publishes about itself, under `/tandem/<cluster>/workers/<id>` in etcd.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub role: WorkerRole,
    /// gRPC host:port.
    pub grpc: String,
    pub model: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Data-parallel ranks, each taking its own requests (an expert-parallel worker's `--ep`):
    /// routers spread load in proportion. Records without it have one.
    #[serde(default = "one_rank")]
    pub ranks: u32,
}

fn one_rank() -> u32 {
    1
}

impl WorkerRecord {
    /// The record of the worker `description` describes, serving `role` at `grpc`.
    pub fn from_description(
        description: tandem_proto::internal::v1::WorkerDescription,
        role: WorkerRole,
        grpc: String,
    ) -> Self {
        Self {
            id: description.worker_id,
            role,
            grpc,
            model: description.model,
            device: description.device,
            ranks: description.expert_parallel.max(1),
        }
    }
}

/// What an SRE asked of a worker, under `/tandem/<cluster>/desired/<id>` in etcd. It outlives
/// the worker's registration and every router, so all routers agree and a restarted one
/// remembers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Send it no new requests.
    #[serde(default)]
    pub cordoned: bool,
    /// Cordoned, and an SRE is waiting for its requests to finish.
    #[serde(default)]
    pub draining: bool,
    /// The role an SRE moved it to; a restarted worker starts in it. None: the role its
    /// binary starts in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<WorkerRole>,
}

/// Desired states by worker id.
pub type DesiredStates = std::collections::BTreeMap<String, DesiredState>;

/// Failures talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("etcd {op}: {status}")]
    Etcd {
        op: &'static str,
        #[source]
        status: tonic::Status,
    },
    #[error("etcd granted no lease: {0}")]
    Lease(String),
    #[error("worker record: {0}")]
    Record(#[from] serde_json::Error),
}

/// A published record. Dropping it withdraws the record; [`Registration::lost`] resolves if
/// the registry withdrew it first (the lease expired), after which the worker must stop taking
/// work.
pub struct Registration {
    lost: watch::Receiver<bool>,
    publication: Box<dyn Publication>,
}

/// What keeps one record published: it can replace the record, and withdraws it on drop.
#[tonic::async_trait]
pub(crate) trait Publication: Send + Sync {
    async fn republish(&self, record: &WorkerRecord) -> Result<(), RegistryError>;
}

impl Registration {
    pub(crate) fn new(lost: watch::Receiver<bool>, publication: Box<dyn Publication>) -> Self {
        Self { lost, publication }
    }

    /// Resolves once the registry has dropped this record.
    pub async fn lost(&self) {
        let _ = self.lost.clone().wait_for(|lost| *lost).await;
    }

    /// Replaces the published record (same id, same lease), e.g. after a role change, so
    /// watchers see one change and never a gap.
    pub async fn update(&self, record: &WorkerRecord) -> Result<(), RegistryError> {
        self.publication.republish(record).await
    }
}

/// The worker directory. Two real implementations: [`EtcdRegistry`], [`EmbeddedRegistry`].
#[tonic::async_trait]
pub trait Registry: Send + Sync {
    /// Publishes `record` until the registration drops or is lost.
    async fn register(&self, record: WorkerRecord) -> Result<Registration, RegistryError>;
    /// Every worker now, then again after every change (sorted by id). Survives registry
    /// restarts by resynchronizing.
    async fn watch_workers(&self) -> Result<watch::Receiver<Vec<WorkerRecord>>, RegistryError>;
    /// Records what an SRE asked of worker `id`.
    async fn set_desired(&self, id: &str, desired: DesiredState) -> Result<(), RegistryError>;
    /// Every desired state now, then again after every change.
    async fn watch_desired(&self) -> Result<watch::Receiver<DesiredStates>, RegistryError>;
}

/// How long a registry connection waits before retrying after an error.
pub(crate) const RETRY: Duration = Duration::from_millis(500);
