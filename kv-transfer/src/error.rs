use std::net::SocketAddr;

/// Failures of sending or receiving KV frames.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("kv frame of {len} bytes is over the limit of {limit} bytes")]
    FrameTooLarge { len: u64, limit: usize },
    #[error("kv stream is corrupt: {0}")]
    Corrupt(String),
    #[error("connecting to kv endpoint {endpoint}: {source}")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("kv connection to {endpoint} failed: {source}")]
    Io {
        endpoint: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("kv connection to {0} closed")]
    Closed(SocketAddr),
    #[error("kv stream: {0}")]
    Stream(#[from] std::io::Error),
}
