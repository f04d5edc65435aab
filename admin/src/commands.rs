//! One module per verb.

use std::path::PathBuf;

use tandem_common::tls::{Tls, TlsArgs};

pub mod admin;
pub mod bench;
pub mod generate;
pub mod plan;
mod remote_generate;
pub mod up;

/// TLS to the router, from the --tls-* flags.
pub(crate) fn client_tls(args: &TlsArgs) -> Result<Option<Tls>, CommandError> {
    args.load_client()
        .map_err(|e| CommandError::Usage(e.to_string()))
}

/// A gRPC channel to the router at `router` (host:port), named `flag` in errors.
pub(crate) async fn router_channel(
    router: &str,
    flag: &str,
    tls: &TlsArgs,
) -> Result<tonic::transport::Channel, CommandError> {
    tonic::transport::Endpoint::from_shared(format!("http://{router}"))
        .map_err(|e| CommandError::Usage(format!("{flag} `{router}` is not host:port: {e}")))?;
    let tls = client_tls(tls)?;
    tandem_common::tls::grpc_connect(router, tls.as_ref())
        .await
        .map_err(|source| CommandError::Connect {
            router: router.to_owned(),
            source,
        })
}

/// Adds `authorization: Bearer <token>` to every call when there is a token.
#[derive(Debug, Clone)]
pub(crate) struct BearerToken(Option<tonic::metadata::AsciiMetadataValue>);

impl BearerToken {
    /// `token` (from flag `flag`) as a header value.
    pub(crate) fn new(token: Option<&str>, flag: &str) -> Result<Self, CommandError> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| CommandError::Usage(format!("{flag} must be printable ASCII")))
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the router's inference API, presenting `--api-key` when given.
pub(crate) type InferenceRpc = tandem_proto::v1::inference_client::InferenceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

pub(crate) async fn inference_client(
    router: &str,
    api_key: Option<&str>,
    tls: &TlsArgs,
) -> Result<InferenceRpc, CommandError> {
    let channel = router_channel(router, "--router", tls).await?;
    Ok(
        tandem_proto::v1::inference_client::InferenceClient::with_interceptor(
            channel,
            BearerToken::new(api_key, "--api-key")?,
        ),
    )
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
    #[error("router {router}: {:?}: {}{}", status.code(), status.message(), causes(status))]
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

/// What lies under a status that a broken connection produced, as `: cause: cause (hint)`;
/// empty for statuses the router sent.
fn causes(status: &tonic::Status) -> String {
    let mut out = String::new();
    let mut next = std::error::Error::source(status);
    while let Some(cause) = next {
        out.push_str(&format!(": {cause}"));
        next = cause.source();
    }
    if !out.is_empty() {
        // A TLS refusal reaches a client only as a closed connection; the router logs why.
        out.push_str(
            " (the connection broke: a router with TLS needs --tls-ca, and with mutual TLS \
             a --tls-cert/--tls-key from its CA; its log says why it refused)",
        );
    }
    out
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
