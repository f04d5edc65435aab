//! Workers and routers meeting through a real etcd: registration, lease expiry after a crash,
//! serving through an etcd restart, and all of it at once under load (the chaos test).

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tandem_proto::internal::v1::StatsRequest;
use tandem_proto::internal::v1::worker_client::WorkerClient;
use tandem_proto::v1::inference_client::InferenceClient;
use tandem_proto::v1::{GenerateRequest, TokenIds, generate_request, generate_response};
use tandem_tests::{Cluster, Etcd, Process, TEST_LEASE_TTL_SECONDS, binary, fixture, log_dir};

/// Runs `tandemctl args -o json --endpoint endpoint`, which must succeed; its output.
fn tandemctl(args: &[&str], endpoint: &str) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json", "--endpoint", endpoint]);
    tandem_tests::tandemctl_json(&all)
}

fn worker_ids(endpoint: &str) -> Vec<String> {
    let workers = tandemctl(&["get", "workers"], endpoint);
    let mut ids: Vec<String> = workers
        .as_array()
        .expect("array")
        .iter()
        .map(|w| w["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

/// Polls `get workers` until it equals `expected`; returns how long that took.
fn wait_for_ids(endpoint: &str, expected: &[&str], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let ids = worker_ids(endpoint);
        if ids == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "workers {ids:?}, expected {expected:?} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn generate(url: String) -> Result<usize, tonic::Status> {
    let mut client = InferenceClient::connect(url).await.expect("router");
    let request = GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
            ids: vec![3, 4, 5, 6],
        })),
        max_tokens: Some(6),
        ignore_eos: true,
        ..GenerateRequest::default()
    };
    let mut stream = client.generate(request).await?.into_inner();
    let mut messages = 0;
    while stream.message().await?.is_some() {
        messages += 1;
    }
    Ok(messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_in_etcd_and_vanish_within_the_lease_ttl_after_kill_9() {
    let Some(etcd) = Etcd::start("registry-kill") else {
        return;
    };
    let cluster = Cluster::builder("registry-kill")
        .model(fixture("qwen3-moe-f32"))
        .decode(2)
        .etcd(etcd.endpoint())
        .start();
    let endpoint = cluster.router.addr("grpc");
    let all = ["decode-0", "decode-1", "prefill-0"];
    wait_for_ids(&endpoint, &all, Duration::from_secs(10));
    cluster.decode[1].signal(Signal::SIGKILL);
    let gone_after = wait_for_ids(
        &endpoint,
        &["decode-0", "prefill-0"],
        Duration::from_secs(TEST_LEASE_TTL_SECONDS + 5),
    );
    assert!(
        gone_after <= Duration::from_secs(TEST_LEASE_TTL_SECONDS + 1),
        "the killed worker left after {gone_after:?}, lease TTL {TEST_LEASE_TTL_SECONDS} s"
    );
    assert_eq!(generate(cluster.router_url()).await.expect("served"), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_continues_while_etcd_restarts_and_the_registry_resynchronizes() {
    let Some(mut etcd) = Etcd::start("registry-restart") else {
        return;
    };
    let builder = Cluster::builder("registry-restart")
        .model(fixture("qwen3-moe-f32"))
        .etcd(etcd.endpoint());
    let registry_args = builder.registry_args();
    let cluster = builder.start();
    let endpoint = cluster.router.addr("grpc");
    wait_for_ids(
        &endpoint,
        &["decode-0", "prefill-0"],
        Duration::from_secs(10),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let url = cluster.router_url();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut served = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                served.push(generate(url.clone()).await);
            }
            served
        })
    };
    etcd.kill();
    // Requests keep flowing while etcd is down.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(1) {
        generate(cluster.router_url())
            .await
            .expect("served while etcd is down");
    }
    etcd.restart();
    // A worker that joins after the restart shows up: the router's watch resynchronized.
    let mut args: Vec<OsString> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--worker-id",
        "decode-late",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push("--model".into());
    args.push(fixture("qwen3-moe-f32").into_os_string());
    args.extend(registry_args);
    let _late = Process::start(
        "decode-late",
        &binary("tandem-decode-worker"),
        &args,
        &log_dir("registry-restart-late"),
    );
    wait_for_ids(
        &endpoint,
        &["decode-0", "decode-late", "prefill-0"],
        Duration::from_secs(15),
    );
    stop.store(true, Ordering::Relaxed);
    let served = load.await.expect("load");
    assert!(!served.is_empty());
    for result in served {
        result.expect("no request failed across the etcd restart");
    }
}

async fn tokens_total(url: String) -> u64 {
    use tandem_proto::internal::v1::StatsRequest;
    use tandem_proto::internal::v1::worker_client::WorkerClient;
    WorkerClient::connect(url)
        .await
        .expect("worker")
        .stats(StatsRequest {})
        .await
        .expect("stats")
        .into_inner()
        .tokens_total
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;
const DECODE_SERVICE: &str = "tandem.internal.v1.Decode";

/// grpc.health.v1 status of the decode service on the worker at `url`.
async fn health_status(url: String) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Channel::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("worker");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: DECODE_SERVICE.into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status
}

/// Polls until the decode service on `url` reports `status`.
async fn wait_for_health(url: String, status: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while health_status(url.clone()).await != status {
        assert!(Instant::now() < deadline, "{url} never reported {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of(endpoint: &str, id: &str) -> String {
    let workers = tandemctl(&["get", "workers"], endpoint);
    workers
        .as_array()
        .expect("array")
        .iter()
        .find(|w| w["id"] == id)
        .map(|w| w["state"].as_str().expect("state").to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordon_through_one_router_holds_on_every_router_and_survives_a_router_restart() {
    let Some(etcd) = Etcd::start("registry-desired") else {
        return;
    };
    let cluster = Cluster::builder("registry-desired")
        .model(fixture("qwen3-moe-f32"))
        .decode(2)
        .etcd(etcd.endpoint())
        .start();
    let router_args = || -> Vec<OsString> {
        [
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &etcd.endpoint(),
            "--cluster",
            "registry-desired",
        ]
        .iter()
        .map(OsString::from)
        .collect()
    };
    let logs = log_dir("registry-desired-routers");
    let second = Process::start("router-b", &binary("tandem-router"), &router_args(), &logs);
    let first = cluster.router.addr("grpc");
    tandemctl(&["cordon", "decode-0"], &first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state_of(&second.addr("grpc"), "decode-0") != "cordoned" {
        assert!(Instant::now() < deadline, "router-b never saw the cordon");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Router B sends nothing to decode-0 either.
    let before = tokens_total(cluster.decode[0].url()).await;
    for _ in 0..4 {
        generate(second.url()).await.expect("served by decode-1");
    }
    assert_eq!(tokens_total(cluster.decode[0].url()).await, before);
    // The worker itself follows the recorded state: NOT_SERVING for probes while cordoned.
    wait_for_health(cluster.decode[0].url(), NOT_SERVING).await;
    assert_eq!(health_status(cluster.decode[1].url()).await, SERVING);
    let decode0 = state_of(&second.addr("grpc"), "decode-0");
    assert_eq!(decode0, "cordoned");
    // A router started afterwards starts from the recorded state.
    drop(second);
    let third = Process::start("router-c", &binary("tandem-router"), &router_args(), &logs);
    assert_eq!(state_of(&third.addr("grpc"), "decode-0"), "cordoned");
    tandemctl(&["uncordon", "decode-0"], &third.addr("grpc"));
    wait_for_health(cluster.decode[0].url(), SERVING).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_etcd_expires_stops_and_exits_non_zero() {
    let Some(etcd) = Etcd::start("registry-lease") else {
        return;
    };
    let mut cluster = Cluster::builder("registry-lease")
        .model(fixture("qwen3-moe-f32"))
        .decode(2)
        .etcd(etcd.endpoint())
        .start();
    let endpoint = cluster.router.addr("grpc");
    wait_for_ids(
        &endpoint,
        &["decode-0", "decode-1", "prefill-0"],
        Duration::from_secs(10),
    );
    assert_eq!(etcd.revoke_all_leases().await, 3);
    // Every worker learns at its next renewal (TTL/3) that etcd dropped it, and fail-stops.
    for worker in cluster.decode.iter_mut().chain(cluster.prefill.iter_mut()) {
        let status = worker
            .wait_exit(Duration::from_secs(TEST_LEASE_TTL_SECONDS + 5))
            .unwrap_or_else(|| panic!("{} kept running without a lease", worker.name));
        assert_eq!(status.code(), Some(1), "{}: {status:?}", worker.name);
    }
    wait_for_ids(&endpoint, &[], Duration::from_secs(5));
}

/// How one chaos request ended.
#[derive(Debug)]
enum Ended {
    /// The client dropped its stream after the first token, on purpose.
    Cancelled,
    Completed(Vec<u32>),
    Failed(tonic::Status),
}

/// Streams one greedy request; `cancel` drops it after its first chunk.
async fn chaos_request(url: String, prompt: Vec<u32>, max_tokens: u32, cancel: bool) -> Ended {
    let request = GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: prompt })),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..GenerateRequest::default()
    };
    let mut client = match InferenceClient::connect(url).await {
        Ok(client) => client,
        Err(e) => return Ended::Failed(tonic::Status::unavailable(e.to_string())),
    };
    let mut stream = match client.generate(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ended::Failed(status),
    };
    let mut tokens = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(message)) => match message.kind {
                Some(generate_response::Kind::Chunk(chunk)) => {
                    if cancel {
                        return Ended::Cancelled;
                    }
                    tokens.extend(chunk.token_ids);
                }
                Some(generate_response::Kind::Final(_)) => return Ended::Completed(tokens),
                _ => {}
            },
            Ok(None) => {
                return Ended::Failed(tonic::Status::internal("stream ended without a final"));
            }
            Err(status) => return Ended::Failed(status),
        }
    }
}

/// 2 prefill + 2 decode workers behind a router on etcd; 500 streaming requests, one in ten
/// cancelled by its client; one decode worker and one prefill worker killed with SIGKILL and
/// etcd restarted while they run. Every request that was not cancelled ends with exactly the
/// single-process greedy tokens or an explicit error status, none hangs, and afterwards the
/// surviving workers hold no KV block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_stream_ends_exact_or_with_an_explicit_error() {
    const REQUESTS: usize = 500;
    const IN_FLIGHT: usize = 24;
    let Some(mut etcd) = Etcd::start("chaos") else {
        return;
    };
    let model = fixture("qwen3-moe-f32");
    let cluster = Cluster::builder("chaos")
        .model(model.clone())
        .prefill(2)
        .decode(2)
        .etcd(etcd.endpoint())
        .start();
    let endpoint = cluster.router.addr("grpc");
    wait_for_ids(
        &endpoint,
        &["decode-0", "decode-1", "prefill-0", "prefill-1"],
        Duration::from_secs(15),
    );
    let shapes: Vec<(Vec<u32>, u32)> = (0..16u32)
        .map(|i| {
            (
                (0..4 + 3 * i)
                    .map(|j| 3 + (j * 37 + i * 11) % 1000)
                    .collect(),
                8 + i % 8,
            )
        })
        .collect();
    let expected: Vec<Vec<u32>> = shapes
        .iter()
        .map(|(p, n)| tandem_tests::single_process_tokens(&model, p, *n, &["--ignore-eos"]))
        .collect();

    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (prompt, max_tokens) = shapes[i % shapes.len()].clone();
            let (url, finished, slots) = (cluster.router_url(), finished.clone(), slots.clone());
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.expect("semaphore");
                let ended = tokio::time::timeout(
                    Duration::from_secs(90),
                    chaos_request(url, prompt, max_tokens, i % 10 == 3),
                )
                .await;
                finished.fetch_add(1, Ordering::Relaxed);
                ended
            })
        })
        .collect();
    let wait_until = |n: usize| {
        let finished = finished.clone();
        async move {
            while finished.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_until(100).await;
    cluster.decode[1].signal(Signal::SIGKILL);
    wait_until(200).await;
    cluster.prefill[1].signal(Signal::SIGKILL);
    wait_until(300).await;
    etcd.restart();

    let (mut completed, mut cancelled, mut failed) = (0, 0, Vec::new());
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("task") {
            Err(_) => panic!("request {i} hung past 90 s"),
            Ok(Ended::Cancelled) => cancelled += 1,
            Ok(Ended::Completed(tokens)) => {
                assert_eq!(tokens, expected[i % shapes.len()], "request {i}");
                completed += 1;
            }
            Ok(Ended::Failed(status)) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::ResourceExhausted
                    ) && !status.message().is_empty(),
                    "request {i} failed without an explicit status: {status:?}"
                );
                failed.push(status);
            }
        }
    }
    eprintln!(
        "chaos: {completed} completed exactly, {cancelled} cancelled, {} failed explicitly: {:?}",
        failed.len(),
        failed
            .iter()
            .map(|s| s.message())
            .take(3)
            .collect::<Vec<_>>()
    );
    assert_eq!(cancelled, REQUESTS / 10);
    assert!(
        completed >= REQUESTS * 8 / 10,
        "most requests survive the chaos: {completed} of {REQUESTS}"
    );
    for survivor in [&cluster.decode[0], &cluster.prefill[0]] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = WorkerClient::connect(survivor.url())
                .await
                .expect("survivor reachable")
                .stats(StatsRequest {})
                .await
                .expect("stats")
                .into_inner();
            if stats.kv_blocks_used == 0 && stats.running_sequences == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "blocks still held: {stats:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
