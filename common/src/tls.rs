//! TLS (rustls) on every Tandem listener and connection: the router's gRPC and HTTP, a
//! worker's gRPC and KV listeners, and the connections between them. Components prove who
//! they are to each other with certificates from one CA (mutual TLS); clients of the router
//! verify it against that CA and present a certificate unless the router lets them in
//! without one (then API keys tell them apart).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a connecting peer may take over its handshake before it is dropped, so a silent
/// one cannot hold a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections waiting for the server to take them.
const ACCEPT_QUEUE: usize = 64;

/// The TLS flags shared by every binary.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this process presents: on its listeners, and as its client
    /// certificate on connections it opens. With --tls-key; turns TLS on.
    #[arg(
        long,
        env = "TANDEM_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "TANDEM_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) peers' certificates must chain to: servers are verified against
    /// it, and listeners refuse clients without a certificate it signed (mutual TLS).
    #[arg(long, env = "TANDEM_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Verify servers against this name instead of the host they are reached at (one
    /// certificate for a whole fleet whose pods are addressed by IP).
    #[arg(long, env = "TANDEM_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// Whether a listener lets in clients that present no certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Mutual TLS: no certificate from the CA, no connection.
    Required,
    /// A certificate, when presented, must still chain to the CA.
    Optional,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{0}")]
    Config(String),
    #[error("--tls-server-name `{0}` is not a DNS name or IP address")]
    ServerName(String),
}

/// A process's TLS settings, loaded once and shared by its listeners and connections.
#[derive(Clone)]
pub struct Tls {
    server: Option<Arc<ServerConfig>>,
    client: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("serves", &self.server.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(error: rustls::Error) -> TlsError {
    TlsError::Config(error.to_string())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(config_error)?;
    }
    Ok(Arc::new(roots))
}

impl TlsArgs {
    /// TLS for a cluster component (router or worker): None without flags; with them, a
    /// certificate, its key and the CA are all needed, since components both serve and
    /// connect to each other.
    pub fn load_component(&self, clients: ClientCertificates) -> Result<Option<Tls>, TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            if self.tls_ca.is_some() {
                return Err(TlsError::Config(
                    "--tls-ca needs --tls-cert and --tls-key: a component presents a \
                     certificate to its peers"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let Some(ca) = &self.tls_ca else {
            return Err(TlsError::Config(
                "--tls-cert needs --tls-ca: components verify each other against it".into(),
            ));
        };
        let (certs, key, roots) = (certificates(cert)?, private_key(key)?, roots(ca)?);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        let verifier = match clients {
            ClientCertificates::Required => verifier,
            ClientCertificates::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(config_error)?;
        // gRPC clients need h2 by ALPN; the HTTP listener also speaks HTTP/1.1.
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(config_error)?;
        Ok(Some(Tls {
            server: Some(Arc::new(server)),
            client: Arc::new(client),
            server_name: self.server_name()?,
        }))
    }

    /// TLS for a client of the router (tandemctl): on with --tls-ca, presenting --tls-cert
    /// when given.
    pub fn load_client(&self) -> Result<Option<Tls>, TlsError> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() {
                return Err(TlsError::Config(
                    "--tls-cert needs --tls-ca to verify the router against".into(),
                ));
            }
            return Ok(None);
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots(ca)?);
        let mut client = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(config_error)?,
            _ => builder.with_no_client_auth(),
        };
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Tls {
            server: None,
            client: Arc::new(client),
            server_name: self.server_name()?,
        }))
    }

    fn server_name(&self) -> Result<Option<ServerName<'static>>, TlsError> {
        self.tls_server_name
            .as_ref()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name.clone()))
            })
            .transpose()
    }
}

impl Tls {
    /// The name `authority` (host:port) must prove: --tls-server-name, else its host.
    fn name_for(&self, authority: &str) -> io::Result<ServerName<'static>> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{host}` is not a DNS name or IP address to verify a certificate for"),
            )
        })
    }
}

/// Opens a TCP connection to `authority` (host:port), Nagle off, with a TLS handshake when
/// `tls` is set.
pub async fn connect(authority: &str, tls: Option<&Tls>) -> io::Result<Stream> {
    let tcp = TcpStream::connect(authority).await?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(tls) => {
            let name = tls.name_for(authority)?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake timed out")
                })??;
            Ok(Stream::Client(Box::new(stream)))
        }
    }
}

/// The gRPC endpoint of `authority` (host:port).
fn grpc_endpoint(
    authority: &str,
    tls: Option<&Tls>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    tonic::transport::Endpoint::from_shared(format!("{scheme}://{authority}"))
}

/// A gRPC channel to `authority` (host:port), over TLS when `tls` is set, connecting on first
/// use.
pub fn grpc_channel(
    authority: &str,
    tls: Option<&Tls>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = grpc_endpoint(authority, tls)?;
    Ok(match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => endpoint.connect_with_connector_lazy(GrpcConnector(tls.clone())),
    })
}

/// [`grpc_channel`], connected before it returns so an unreachable server fails here.
pub async fn grpc_connect(
    authority: &str,
    tls: Option<&Tls>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = grpc_endpoint(authority, tls)?;
    match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            endpoint
                .connect_with_connector(GrpcConnector(tls.clone()))
                .await
        }
    }
}

/// Opens the TLS connections of a gRPC channel.
#[derive(Clone)]
struct GrpcConnector(Tls);

impl tower::Service<tonic::transport::Uri> for GrpcConnector {
    type Response = hyper_util::rt::TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Self::Future {
        let tls = self.0.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .map(ToString::to_string)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host:port"))?;
            let stream = connect(&authority, Some(&tls)).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Connections accepted on `listener` with Nagle's algorithm off (a gRPC stream writes many
/// small frames, and Nagle waiting on the peer's delayed ACK holds each for ~40 ms), after a
/// TLS handshake when `tls` is set. Handshakes run concurrently, so a slow peer delays only
/// itself; one that fails (no certificate, another CA, plain text) is logged and dropped.
pub fn incoming(listener: TcpListener, tls: Option<&Tls>) -> Incoming {
    let local_addr = listener.local_addr();
    let acceptor = tls
        .and_then(|tls| tls.server.clone())
        .map(tokio_rustls::TlsAcceptor::from);
    let (accepted, receiver) = mpsc::channel(ACCEPT_QUEUE);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                result = listener.accept() => match result {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = accepted.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                if accepted.send(Stream::Plain(tcp)).await.is_err() {
                    return;
                }
                continue;
            };
            let accepted = accepted.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = accepted.send(Stream::Server(Box::new(stream))).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "refused a TLS connection");
                    }
                    Err(_) => tracing::info!(%peer, "a TLS handshake timed out"),
                }
            });
        }
    });
    Incoming {
        receiver,
        local_addr,
    }
}

/// What [`incoming`] accepts, as a stream (for tonic) or one at a time.
#[derive(Debug)]
pub struct Incoming {
    receiver: mpsc::Receiver<Stream>,
    local_addr: io::Result<SocketAddr>,
}

impl Incoming {
    /// The next connection; None once the listener task is gone.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.receiver.recv().await
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.local_addr {
            Ok(addr) => Ok(*addr),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Stream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx).map(|next| next.map(Ok))
    }
}

/// A TCP connection, plain or inside TLS (either end).
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Server(tls) => tls.get_ref().0,
            Self::Client(tls) => tls.get_ref().0,
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }
}

impl tonic::transport::server::Connected for Stream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

/// Runs `$body` on whichever stream `$self` holds.
macro_rules! each_stream {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Stream::Plain($s) => $body,
            Stream::Server($s) => $body,
            Stream::Client($s) => $body,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each_stream!(self, s => s.is_write_vectored())
    }
}
