use std::time::Duration;

use tandem_common::error_class::ErrorClass;
use tandem_common::ids::TransferId;
use tandem_engine::EngineError;
use tandem_kv_transfer::TransferError;

/// Failures a worker RPC answers with.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("pushing kv: {0}")]
    Push(#[from] TransferError),
    #[error("kv transfer {transfer} did not complete within {timeout:?}")]
    TransferTimeout {
        transfer: TransferId,
        timeout: Duration,
    },
    #[error("kv transfer {transfer} failed: {reason}")]
    TransferFailed {
        transfer: TransferId,
        reason: String,
    },
    #[error("request queue is full: {depth} requests waiting, limit --queue-depth {depth}")]
    QueueFull { depth: usize },
    #[error("the engine thread stopped")]
    EngineStopped,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("this worker does not serve the {role} role now (it was moved or is switching)")]
    NotInRole { role: &'static str },
    #[error("{0}")]
    Busy(String),
}

impl WorkerError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Engine(e) if e.is_invalid_request() => ErrorClass::InvalidRequest,
            Self::Engine(e) if e.is_capacity() => ErrorClass::Overloaded,
            Self::Engine(_) | Self::EngineStopped => ErrorClass::Internal,
            Self::InvalidRequest(_) => ErrorClass::InvalidRequest,
            Self::Push(_) | Self::TransferFailed { .. } => ErrorClass::Unavailable,
            Self::TransferTimeout { .. } => ErrorClass::Timeout,
            Self::QueueFull { .. } => ErrorClass::Overloaded,
            Self::NotInRole { .. } => ErrorClass::Unavailable,
            Self::Busy(_) => ErrorClass::Precondition,
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        e.class().status(e)
    }
}
