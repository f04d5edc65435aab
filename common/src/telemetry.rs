//! Logs and traces shared by every binary. Logs go to stderr (stdout stays for ready lines and
//! command output), filtered by `RUST_LOG` (default `info`): text, colored only on a terminal,
//! or one JSON object per line with `TANDEM_LOG_FORMAT=json`. With `--otlp-endpoint`, spans
//! are exported over OTLP/gRPC as well: the router's span per request is the parent of the
//! workers' spans for it, through W3C trace context in gRPC metadata.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How long exiting waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The tracing flag shared by the router and workers.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TraceArgs {
    /// OpenTelemetry collector to export spans to over OTLP/gRPC (e.g. http://otel:4317): one
    /// span per request in the router, children in the workers, under one trace id. Off when
    /// unset.
    #[arg(long, env = "TANDEM_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// Flushes exported spans when dropped (at exit).
#[must_use = "spans are flushed when this is dropped"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(FLUSH_TIMEOUT);
        }
    }
}

/// Logs, and spans to `traces.otlp_endpoint` as service `service` when it is set. Call it
/// inside the tokio runtime: the exporter's gRPC channel lives there. A collector that cannot
/// be set up is logged and traces stay off; the process serves regardless.
pub fn init_with_traces(service: &'static str, traces: &TraceArgs) -> Telemetry {
    let provider = traces
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| tracer_provider(service, endpoint));
    let (provider, failure) = match provider {
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(error)) => (None, Some(error)),
        None => (None, None),
    };
    let layer = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .boxed()
    });
    let _ = subscriber(layer).try_init();
    if let Some(error) = failure {
        tracing::warn!(%error, "--otlp-endpoint: traces are off");
    }
    Telemetry { provider }
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn subscriber(traces: Option<BoxedLayer>) -> impl tracing::Subscriber + Send + Sync {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if std::env::var("TANDEM_LOG_FORMAT").as_deref() == Ok("json") {
        logs.json().with_current_span(true).boxed()
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    // Traces first: the filter applies to logs and spans alike.
    tracing_subscriber::registry()
        .with(traces)
        .with(logs)
        .with(filter)
}

fn tracer_provider(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// `message` as a request carrying the current span's trace context, so the callee's spans
/// join the caller's trace.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
    });
    request
}

/// A span for one incoming gRPC call (tonic's `trace_fn`), child of the caller's trace when
/// the call carries one.
pub fn rpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("rpc", rpc.method = %request.uri().path());
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
