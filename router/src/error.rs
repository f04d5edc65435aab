//! Every way a request can fail at the router, and the one place they become gRPC statuses.

use tandem_common::error_class::ErrorClass;

/// A failed request. Messages name the field, the limit and the value.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{0}")]
    Invalid(String),
    #[error("model `{asked}` is not served here; this cluster serves `{served}`")]
    UnknownModel { asked: String, served: String },
    #[error(
        "router is full: {concurrent} requests running (--max-concurrent-requests) and {waiting} waiting (--queue-depth {waiting})"
    )]
    QueueFull { concurrent: usize, waiting: usize },
    #[error("request did not finish within {seconds} s (--request-timeout-seconds)")]
    Timeout { seconds: f64 },
    #[error("no healthy {role} worker")]
    NoWorker { role: &'static str },
    #[error("{role} worker {addr}: {}", status.message())]
    Worker {
        role: &'static str,
        addr: String,
        status: tonic::Status,
    },
    #[error("the client closed the stream")]
    ClientGone,
    #[error("{0}")]
    Unauthenticated(String),
    #[error(
        "{client} is over its rate limit of {per_second} requests/s with bursts of {burst} (--rate-limit-per-client, --rate-limit-burst)"
    )]
    RateLimited {
        client: String,
        per_second: f64,
        burst: f64,
    },
    #[error("{0}")]
    Internal(String),
}

impl RouterError {
    /// True when a worker could not be reached or broke off (not when it refused the
    /// request): another worker may well succeed. A status this router's client made from a
    /// transport error (an HTTP/2 stream reset by a worker shutting down, say) carries that
    /// error as its source, whatever its code; a status the worker sent carries none.
    pub(crate) fn is_worker_failure(&self) -> bool {
        matches!(self, Self::Worker { status, .. }
            if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
                || std::error::Error::source(status).is_some())
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Invalid(_) => ErrorClass::InvalidRequest,
            Self::UnknownModel { .. } => ErrorClass::NotFound,
            Self::QueueFull { .. } | Self::RateLimited { .. } => ErrorClass::Overloaded,
            Self::Unauthenticated(_) => ErrorClass::Unauthenticated,
            Self::Timeout { .. } => ErrorClass::Timeout,
            Self::NoWorker { .. } => ErrorClass::Unavailable,
            Self::Worker { status, .. } => match status.code() {
                tonic::Code::InvalidArgument => ErrorClass::InvalidRequest,
                tonic::Code::ResourceExhausted => ErrorClass::Overloaded,
                tonic::Code::DeadlineExceeded => ErrorClass::Timeout,
                tonic::Code::Cancelled => ErrorClass::Cancelled,
                tonic::Code::Internal => ErrorClass::Internal,
                _ => ErrorClass::Unavailable,
            },
            Self::ClientGone => ErrorClass::Cancelled,
            Self::Internal(_) => ErrorClass::Internal,
        }
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        e.class().status(e)
    }
}
