//! Prometheus metrics and probe endpoints on `--metrics-listen`, plain HTTP: `/metrics` (text
//! exposition format), `/healthz` (the process runs) and `/readyz` (it serves). Plain even
//! with TLS on, since kubelet probes and most scrapers present no client certificate; keep
//! the port inside the cluster network (the Helm chart's NetworkPolicy does).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a scraper may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; anything longer is refused.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Labels of a metric family: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Seconds from 1 ms to ~65 s, doubling: latencies from an inter-token gap to a long prefill.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

/// A histogram of seconds over [`latency_buckets`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// What a process exposes.
pub trait Exporter: Send + Sync + 'static {
    /// The metrics registry, after refreshing values read at scrape time.
    fn scrape(&self) -> impl Future<Output = Arc<Registry>> + Send;
    /// True while the process serves (readiness).
    fn ready(&self) -> bool;
}

/// The registry in Prometheus' text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve<E: Exporter>(listener: TcpListener, exporter: Arc<E>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let exporter = Arc::clone(&exporter);
        tokio::spawn(async move {
            let _ = answer(stream, exporter.as_ref()).await;
        });
    }
}

/// Answers one request and closes the connection.
async fn answer<E: Exporter>(mut stream: TcpStream, exporter: &E) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .unwrap_or(Ok(None))?;
    let request_line = head.as_deref().and_then(|h| h.lines().next()).unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode(&*exporter.scrape().await),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if exporter.ready() => ("200 OK", "text/plain", "ready\n".to_owned()),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not serving\n".to_owned(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (
            "400 Bad Request",
            "text/plain",
            "GET /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The request head up to its blank line; None when it is too long or the peer stops early.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

/// Binds `--metrics-listen` and serves `exporter` there; returns the bound address.
pub async fn start<E: Exporter>(
    addr: std::net::SocketAddr,
    exporter: Arc<E>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, exporter));
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    struct Fixed {
        registry: Arc<Registry>,
        ready: AtomicBool,
    }

    impl Exporter for Fixed {
        async fn scrape(&self) -> Arc<Registry> {
            Arc::clone(&self.registry)
        }

        fn ready(&self) -> bool {
            self.ready.load(Ordering::Relaxed)
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn metrics_and_probes_answer_over_http() {
        let mut registry = Registry::with_prefix("tandem_test");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Requests by outcome", requests.clone());
        let latency = latency_histogram();
        registry.register_with_unit("latency", "A latency", Unit::Seconds, latency.clone());
        requests
            .get_or_create(&vec![("outcome", "ok".into())])
            .inc_by(3);
        latency.observe(0.003);
        let exporter = Arc::new(Fixed {
            registry: Arc::new(registry),
            ready: AtomicBool::new(false),
        });
        let addr = start("127.0.0.1:0".parse().expect("addr"), Arc::clone(&exporter))
            .await
            .expect("bind");

        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("tandem_test_requests_total{outcome=\"ok\"} 3"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tandem_test_latency_seconds_bucket{le=\"0.004\"} 1"),
            "{metrics}"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        exporter.ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
