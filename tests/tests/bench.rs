//! `tandemctl bench` against a real cluster, over gRPC and over OpenAI HTTP: every request
//! completes with exactly its output length, the JSON report is consistent and the chart is
//! an SVG.

use std::process::Command;

use serde_json::Value;
use tandem_tests::{Cluster, binary, fixture, log_dir};

fn bench(args: &[&str], json: &std::path::Path) -> Value {
    let out = Command::new(binary("tandemctl"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(json)
        .args(["--quiet", "--requests", "12", "--isl", "16", "--osl", "6"])
        .output()
        .expect("tandemctl bench runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(json).expect("report written")).expect("json report")
}

fn check_point(point: &Value, requests: u64, osl: u64) {
    assert_eq!(point["completed"], requests, "{point}");
    assert_eq!(point["failed"], 0, "{point}");
    let wall = point["wall_seconds"].as_f64().expect("wall");
    let tokens = point["output_tokens_per_second"].as_f64().expect("tok/s") * wall;
    assert!(
        (tokens - (requests * osl) as f64).abs() < 1e-6 * tokens.max(1.0),
        "every request yields its output length: {point}"
    );
    for metric in ["ttft_ms", "tpot_ms", "e2e_ms"] {
        let p = &point[metric];
        let (p50, p90, p99) = (p["p50"].as_f64(), p["p90"].as_f64(), p["p99"].as_f64());
        assert!(
            p50 <= p90 && p90 <= p99,
            "{metric} percentiles in order: {point}"
        );
    }
    assert!(
        point["ttft_ms"]["p50"].as_f64() <= point["e2e_ms"]["p50"].as_f64(),
        "{point}"
    );
}

#[test]
fn bench_reports_every_request_over_grpc_and_http() {
    let cluster = Cluster::builder("bench")
        .model(fixture("qwen3-moe-f32"))
        .router_args(&["--http-listen", "127.0.0.1:0"])
        .start();
    let logs = log_dir("bench");
    let chart = logs.join("bench.svg");
    let grpc = bench(
        &[
            "--router",
            &cluster.router.addr("grpc"),
            "--concurrency",
            "1,4",
            "--chart",
            chart.to_str().expect("utf-8 path"),
            "--slo-ttft-ms",
            "60000",
        ],
        &logs.join("grpc.json"),
    );
    let points = grpc["points"].as_array().expect("points");
    assert_eq!(points.len(), 2, "one point per concurrency");
    for point in points {
        check_point(point, 12, 6);
        assert_eq!(
            point["goodput_requests_per_second"], point["requests_per_second"],
            "a one-minute TTFT SLO is met by every request: {point}"
        );
    }
    let svg = std::fs::read_to_string(&chart).expect("chart written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<polyline").count(),
        3,
        "two CDFs and the sweep line"
    );

    let http = format!("http://{}/v1", cluster.router.addr("http"));
    let report = bench(
        &[
            "--http",
            &http,
            "--workload",
            "shared-prefix",
            "--prefix-len",
            "32",
            "--rate",
            "50",
        ],
        &logs.join("http.json"),
    );
    check_point(&report["points"][0], 12, 6);
    assert_eq!(report["points"][0]["rate"], 50.0);
}
