//! Metrics: every process of a cluster serves `/metrics`, `/healthz` and `/readyz`; a real
//! Prometheus scrapes them and, after traffic, its query API returns the router's TTFT
//! histogram and the workers' prefill and KV-transfer figures.

use std::time::{Duration, Instant};

use tandem_tests::prometheus::{Prometheus, http_get};
use tandem_tests::{Cluster, binary};

#[test]
fn prometheus_scrapes_ttft_and_worker_metrics_from_a_cluster() {
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let cluster = Cluster::builder("metrics")
        .router_args(&metrics)
        .prefill_args(&metrics)
        .decode_args(&metrics)
        .start();
    let processes = [&cluster.router, &cluster.prefill[0], &cluster.decode[0]];
    let targets: Vec<String> = processes.iter().map(|p| p.addr("metrics")).collect();
    for target in &targets {
        assert_eq!(http_get(target, "/healthz").expect("healthz").0, 200);
        assert_eq!(http_get(target, "/readyz").expect("readyz").0, 200);
    }
    let Some(prometheus) = Prometheus::start("metrics", &targets) else {
        return;
    };

    const REQUESTS: usize = 3;
    for _ in 0..REQUESTS {
        let status = std::process::Command::new(binary("tandemctl"))
            .args(["generate", "--router", &cluster.router.addr("grpc")])
            .args([
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "8",
                "--ignore-eos",
            ])
            .output()
            .expect("tandemctl runs")
            .status;
        assert!(status.success());
    }
    let (_, router_text) = http_get(&targets[0], "/metrics").expect("router metrics");
    assert!(
        router_text.contains("tandem_router_requests_total{outcome=\"ok\"} 3"),
        "{router_text}"
    );
    assert!(
        router_text.contains("tandem_router_output_tokens_total 24"),
        "{router_text}"
    );

    // Prometheus scrapes every second; wait for a scrape after the traffic.
    let expected = [
        (
            "tandem_router_time_to_first_token_seconds_count",
            REQUESTS as f64,
        ),
        (
            "tandem_router_inter_token_latency_seconds_count",
            (REQUESTS * 7) as f64,
        ),
        (
            "tandem_worker_prefill_duration_seconds_count",
            REQUESTS as f64,
        ),
        ("sum(tandem_worker_tokens_total)", (REQUESTS * 8) as f64),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (expr, at_least) in expected {
        loop {
            match prometheus.query(expr) {
                Some(value) if value >= at_least => break,
                seen => assert!(
                    Instant::now() < deadline,
                    "{expr}: {seen:?} after 60 s, want >= {at_least}"
                ),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let kv_bytes = prometheus
        .query("tandem_worker_kv_transfer_bytes_total")
        .expect("kv bytes");
    assert!(kv_bytes > 0.0, "{kv_bytes}");
    let p50 = prometheus
        .query("histogram_quantile(0.5, tandem_router_time_to_first_token_seconds_bucket)")
        .expect("ttft p50");
    assert!(p50 > 0.0 && p50 < 60.0, "ttft p50 {p50}");
}

#[test]
fn every_grafana_dashboard_query_parses_in_prometheus() {
    let Some(prometheus) = Prometheus::start("dashboard", &[]) else {
        return;
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/tandem-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            // query() asserts Prometheus accepted the expression (HTTP 200, not 400).
            prometheus.query(&expr.replace("$__rate_interval", "1m"));
            queries += 1;
        }
    }
    assert!(queries >= 13, "{queries}");
}
