//! One module per verb.

use std::path::PathBuf;

pub mod admin;
pub mod bench;
pub mod generate;
mod remote_generate;
pub mod up;

/// A gRPC channel to the router at `router` (host:port), named `flag` in errors.
pub(crate) async fn router_channel(
    router: &str,
    flag: &str,
) -> Result<tonic::transport::Channel, CommandError> {
    tonic::transport::Endpoint::from_shared(format!("http://{router}"))
        .map_err(|e| CommandError::Usage(format!("{flag} `{router}` is not host:port: {e}")))?
        .connect()
        .await
        .map_err(|source| CommandError::Connect {
            router: router.to_owned(),
            source,
        })
}

/// Failures of a `tandemctl` command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot find the {binary} binary next to tandemctl ({searched}) or on PATH")]
    BinaryNotFound {
        binary: &'static str,
        searched: String,
    },
    #[error("starting {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("router {router}: {:?}: {}", status.code(), status.message())]
    Rpc {
        router: String,
        status: tonic::Status,
    },
    #[error("connecting to router {router}: {source}")]
    Connect {
        router: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{process} {what}")]
    Cluster { process: String, what: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CommandError {
    /// True when the user's input was at fault (exit code 64).
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Usage(_) => true,
            Self::Rpc { status, .. } => matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::OutOfRange
            ),
            _ => false,
        }
    }
}
