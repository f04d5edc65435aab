//! Traces: with `--otlp-endpoint`, one request yields spans from the router, the prefill
//! worker and the decode worker under one trace id, received by a real OTLP/gRPC receiver
//! (the OpenTelemetry Collector's protocol, served here from the `opentelemetry-proto` types).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tandem_tests::{Cluster, binary};
use tonic::{Request, Response, Status};

/// One received span.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = self.0.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_router_prefill_and_decode() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let receiver = Receiver::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let otlp = ["--otlp-endpoint", endpoint.as_str()];
    let cluster = Cluster::builder("traces")
        .router_args(&otlp)
        .prefill_args(&otlp)
        .decode_args(&otlp)
        .start();
    let router = cluster.router.addr("grpc");
    let status = tokio::task::block_in_place(|| {
        std::process::Command::new(binary("tandemctl"))
            .args([
                "generate",
                "--router",
                &router,
                "--prompt",
                "Once upon a time",
            ])
            .args(["--max-tokens", "4"])
            .status()
            .expect("tandemctl runs")
    });
    assert!(status.success());

    // The batch exporters send every few seconds (and at exit).
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let spans = receiver.0.lock().expect("lock").clone();
        let request_span = spans
            .iter()
            .find(|s| s.service == "tandem-router" && s.name == "request");
        if let Some(request_span) = request_span {
            let in_trace: Vec<Received> = spans
                .iter()
                .filter(|s| s.trace_id == request_span.trace_id)
                .cloned()
                .collect();
            let services = |name: &str| in_trace.iter().any(|s| s.service == name);
            if services("tandem-prefill-worker") && services("tandem-decode-worker") {
                break in_trace;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no trace spanning router, prefill and decode in 30 s: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The workers' spans are children of spans of the same trace, not roots of their own.
    for span in trace.iter().filter(|s| s.service != "tandem-router") {
        assert!(!span.parent_span_id.is_empty(), "{span:?} has no parent");
        assert!(
            trace.iter().any(|s| s.span_id == span.parent_span_id),
            "{span:?}'s parent is not in the trace"
        );
    }
}
