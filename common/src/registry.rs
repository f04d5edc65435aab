//! Where workers announce themselves and routers find them: etcd for fleets, an embedded
//! in-process registry for one machine. Both publish [`WorkerRecord`]s and hand watchers a
//! full snapshot after every change.

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
}

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
    _withdraw: Box<dyn Send + Sync>,
}

impl Registration {
    pub(crate) fn new(lost: watch::Receiver<bool>, withdraw: Box<dyn Send + Sync>) -> Self {
        Self {
            lost,
            _withdraw: withdraw,
        }
    }

    /// Resolves once the registry has dropped this record.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
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
}

/// How long a registry connection waits before retrying after an error.
pub(crate) const RETRY: Duration = Duration::from_millis(500);
