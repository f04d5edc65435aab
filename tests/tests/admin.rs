//! The SRE verbs against a live cluster: `tandemctl get`, `cordon`, `drain`, `move`,
//! `rebalance` and the admin token, with real processes and real traffic.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tandem_proto::internal::v1::worker_client::WorkerClient;
use tandem_proto::internal::v1::{DescribeRequest, Role, StatsRequest};
use tandem_proto::v1::inference_client::InferenceClient;
use tandem_proto::v1::{GenerateRequest, TokenIds, generate_request, generate_response};
use tandem_tests::{
    Cluster, ClusterBuilder, Etcd, Process, TEST_LEASE_TTL_SECONDS, binary, fixture, log_dir,
};

fn tandemctl(args: &[&str], endpoint: &str) -> Output {
    Command::new(binary("tandemctl"))
        .args(args)
        .args(["--endpoint", endpoint])
        .env_remove("TANDEM_ADMIN_TOKEN")
        .output()
        .expect("tandemctl runs")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON value")
}

fn states(endpoint: &str) -> Vec<(String, String, String)> {
    let workers = json_of(&tandemctl(&["get", "workers", "-o", "json"], endpoint));
    workers
        .as_array()
        .expect("array")
        .iter()
        .map(|w| {
            let field = |k: &str| w[k].as_str().expect("string").to_owned();
            (field("id"), field("role"), field("state"))
        })
        .collect()
}

async fn tokens_total(url: String) -> u64 {
    WorkerClient::connect(url)
        .await
        .expect("worker")
        .stats(StatsRequest {})
        .await
        .expect("stats")
        .into_inner()
        .tokens_total
}

fn prompt(i: u32) -> Vec<u32> {
    (0..8 + i % 5)
        .map(|j| 11 + (i * 13 + j * 29) % 900)
        .collect()
}

async fn generate(url: String, i: u32) -> Result<Vec<u32>, tonic::Status> {
    let mut client = InferenceClient::connect(url).await.expect("router");
    let request = GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
            ids: prompt(i),
        })),
        max_tokens: Some(12),
        ..GenerateRequest::default()
    };
    let mut stream = client.generate(request).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(m) = stream.message().await? {
        if let Some(generate_response::Kind::Chunk(c)) = m.kind {
            tokens.extend(c.token_ids);
        }
    }
    Ok(tokens)
}

type Results = Vec<(u32, Result<Vec<u32>, tonic::Status>)>;

/// Four clients sending the 8 test prompts in turn, back to back, until stopped.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Results>>,
}

impl SteadyLoad {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..4u32)
            .map(|c| {
                let url = url.clone();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut results = Vec::new();
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) || results.len() < 4 {
                        results.push((i % 8, generate(url.clone(), i % 8).await));
                        i += 4;
                    }
                    results
                })
            })
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients; every request must have succeeded with `expected`'s tokens.
    async fn finish(self, expected: &[Vec<u32>]) {
        self.stop.store(true, Ordering::Relaxed);
        let mut served = 0;
        for client in self.clients {
            for (i, result) in client.await.expect("client") {
                let tokens = result.expect("no request fails");
                assert_eq!(tokens, expected[i as usize], "prompt {i}");
                served += 1;
            }
        }
        assert!(served >= 16, "{served} requests");
    }
}

fn single_process(model: &Path, i: u32) -> Vec<u32> {
    let ids: Vec<String> = prompt(i).iter().map(u32::to_string).collect();
    let out = Command::new(binary("tandemctl"))
        .args([
            "generate",
            "--output",
            "json",
            "--device",
            "cpu",
            "--max-tokens",
            "12",
        ])
        .arg("--model")
        .arg(model)
        .args(["--prompt-ids", &ids.join(",")])
        .output()
        .expect("tandemctl runs");
    json_of(&out)["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_workers_lists_every_worker_and_a_cordoned_one_gets_no_new_request() {
    let cluster = Cluster::builder("admin-cordon")
        .model(fixture("qwen3-moe-f32"))
        .decode(2)
        .start();
    let endpoint = cluster.router.addr("grpc");
    let mut listed = states(&endpoint);
    listed.sort();
    assert_eq!(
        listed,
        [
            ("decode-0".into(), "decode".into(), "ready".into()),
            ("decode-1".into(), "decode".into(), "ready".into()),
            ("prefill-0".into(), "prefill".into(), "ready".into()),
        ]
    );
    let cordoned = json_of(&tandemctl(&["cordon", "decode-0", "-o", "json"], &endpoint));
    assert_eq!(cordoned["state"], "cordoned");
    let before = tokens_total(cluster.decode[0].url()).await;
    for i in 0..6 {
        generate(cluster.router_url(), i).await.expect("served");
    }
    assert_eq!(
        tokens_total(cluster.decode[0].url()).await,
        before,
        "a cordoned worker gets no new request"
    );
    assert!(tokens_total(cluster.decode[1].url()).await > 0);
    let back = json_of(&tandemctl(
        &["uncordon", "decode-0", "-o", "json"],
        &endpoint,
    ));
    assert_eq!(back["state"], "ready");
    let unknown = tandemctl(&["cordon", "decode-9"], &endpoint);
    assert_eq!(unknown.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no worker `decode-9`"));
    let pools = json_of(&tandemctl(&["get", "pools", "-o", "json"], &endpoint));
    assert_eq!(pools["pools"][1]["workers"], 2);
    let yaml = tandemctl(&["describe", "worker", "decode-0", "-o", "yaml"], &endpoint);
    assert!(
        String::from_utf8_lossy(&yaml.stdout).contains("id: \"decode-0\"\n"),
        "{yaml:?}"
    );
    let top = tandemctl(&["top", "--iterations", "1"], &endpoint);
    let screen = String::from_utf8_lossy(&top.stdout);
    assert!(
        screen.contains("POOL") && screen.contains("decode-1"),
        "{screen}"
    );
    let completions = Command::new(binary("tandemctl"))
        .args(["completions", "bash"])
        .output()
        .expect("completions");
    assert!(String::from_utf8_lossy(&completions.stdout).contains("_tandemctl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_decode_worker_under_load_fails_no_request_and_keeps_tokens_exact() {
    let model = fixture("qwen3-moe-f32");
    let cluster = Cluster::builder("admin-drain")
        .model(model.clone())
        .decode(2)
        .start();
    let endpoint = cluster.router.addr("grpc");
    let expected: Vec<Vec<u32>> = (0..8).map(|i| single_process(&model, i)).collect();
    let load = SteadyLoad::start(cluster.router_url());
    // Drain once decode-0 is busy serving the load.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokens_total(cluster.decode[0].url()).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "decode-0 never got load"
        );
        tokio::task::yield_now().await;
    }
    let drain = tokio::task::spawn_blocking({
        let endpoint = endpoint.clone();
        move || {
            tandemctl(
                &["drain", "decode-0", "--timeout", "60", "-o", "json"],
                &endpoint,
            )
        }
    })
    .await
    .expect("drain ran");
    let drained = json_of(&drain);
    assert_eq!(drained["state"], "drained");
    assert_eq!(drained["load"]["running_sequences"], 0);
    let after_drain = tokens_total(cluster.decode[0].url()).await;
    load.finish(&expected).await;
    assert_eq!(
        tokens_total(cluster.decode[0].url()).await,
        after_drain,
        "a drained worker gets nothing new"
    );
    let listed = states(&endpoint);
    assert!(listed.contains(&("decode-0".into(), "decode".into(), "drained".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_without_or_with_a_wrong_token_are_unauthenticated_and_change_nothing() {
    let cluster = Cluster::builder("admin-token")
        .model(fixture("qwen3-moe-f32"))
        .router_args(&["--admin-token", "s3cret"])
        .start();
    let endpoint = cluster.router.addr("grpc");
    let missing = tandemctl(&["cordon", "decode-0"], &endpoint);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("Bearer"),
        "{stderr}"
    );
    let wrong = tandemctl(&["cordon", "decode-0", "--token", "guess"], &endpoint);
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("the admin token is wrong"),
        "{wrong:?}"
    );
    let right = tandemctl(
        &["get", "workers", "-o", "json", "--token", "s3cret"],
        &endpoint,
    );
    let workers = json_of(&right);
    assert!(
        workers
            .as_array()
            .expect("array")
            .iter()
            .all(|w| w["state"] == "ready"),
        "nothing was cordoned: {workers}"
    );
}

async fn role_of(url: String) -> Role {
    let description = WorkerClient::connect(url)
        .await
        .expect("worker")
        .max_decoding_message_size(usize::MAX)
        .describe(DescribeRequest {})
        .await
        .expect("describe")
        .into_inner();
    Role::try_from(description.role).expect("a role")
}

/// (prefill, decode) worker counts from `get workers`, every worker ready.
fn pool_sizes(endpoint: &str) -> (usize, usize) {
    let listed = states(endpoint);
    assert!(
        listed.iter().all(|(_, _, state)| state == "ready"),
        "{listed:?}"
    );
    let prefill = listed
        .iter()
        .filter(|(_, role, _)| role == "prefill")
        .count();
    (prefill, listed.len() - prefill)
}

/// Waits until every worker registered in etcd is ready and the pools have `sizes`; returns
/// the deadline it allowed (20 s from now), for the caller's next wait.
fn wait_for_pools(endpoint: &str, sizes: (usize, usize)) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool_sizes(endpoint) != sizes {
        assert!(Instant::now() < deadline, "workers never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    deadline
}

/// Runs `requests` greedy requests through the router, each equal to its reference.
async fn assert_exact(url: &str, expected: &[Vec<u32>], requests: u32) {
    for i in 0..requests {
        let i = i % expected.len() as u32;
        let tokens = generate(url.to_owned(), i).await.expect("served");
        assert_eq!(tokens, expected[i as usize], "prompt {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_worker_serves_its_new_pool_without_restarting_and_bad_moves_are_refused() {
    let model = fixture("qwen3-moe-f32");
    let mut cluster = Cluster::builder("admin-move")
        .model(model.clone())
        .decode(2)
        .start();
    let endpoint = cluster.router.addr("grpc");
    let expected: Vec<Vec<u32>> = (0..4).map(|i| single_process(&model, i)).collect();

    let out = tandemctl(
        &["move", "decode-1", "--to", "prefill", "-o", "json"],
        &endpoint,
    );
    let moved = json_of(&out);
    assert_eq!(
        (&moved["role"], &moved["state"]),
        (&"prefill".into(), &"ready".into())
    );
    let steps = String::from_utf8_lossy(&out.stderr);
    assert!(
        steps.contains("drained") && steps.contains("serves prefill now"),
        "{steps}"
    );
    assert_eq!(pool_sizes(&endpoint), (2, 1));
    assert!(
        cluster.decode[1].wait_exit(Duration::ZERO).is_none(),
        "the same process serves on, weights loaded"
    );
    assert_eq!(role_of(cluster.decode[1].url()).await, Role::Prefill);
    assert_exact(&cluster.router_url(), &expected, 6).await;
    assert!(
        tokens_total(cluster.decode[1].url()).await > 0,
        "the moved worker prefills prompts"
    );

    let last = tandemctl(&["move", "decode-0", "--to", "prefill"], &endpoint);
    assert_eq!(last.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&last.stderr);
    assert!(stderr.contains("only decode worker"), "{stderr}");
    let uneven = tandemctl(&["rebalance", "--prefill", "3", "--decode", "1"], &endpoint);
    assert_eq!(uneven.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&uneven.stderr);
    assert!(stderr.contains("must add up to 3"), "{stderr}");

    let back = json_of(&tandemctl(
        &["rebalance", "--prefill", "1", "--decode", "2", "-o", "json"],
        &endpoint,
    ));
    assert_eq!(back.as_array().expect("workers").len(), 3);
    assert_eq!(pool_sizes(&endpoint), (1, 2));
    assert_exact(&cluster.router_url(), &expected, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_under_steady_load_fails_no_request_and_a_restarted_worker_keeps_its_new_role()
{
    let Some(etcd) = Etcd::start("admin-rebalance") else {
        return;
    };
    let model = fixture("qwen3-moe-f32");
    let builder = Cluster::builder("admin-rebalance")
        .model(model.clone())
        .prefill(2)
        .decode(2)
        .etcd(etcd.endpoint());
    let mut cluster = builder.clone().start();
    let endpoint = cluster.router.addr("grpc");
    let expected: Vec<Vec<u32>> = (0..8).map(|i| single_process(&model, i)).collect();
    let deadline = wait_for_pools(&endpoint, (2, 2));

    let load = SteadyLoad::start(cluster.router_url());
    while tokens_total(cluster.decode[0].url()).await == 0 {
        assert!(Instant::now() < deadline, "no load reached decode-0");
        tokio::task::yield_now().await;
    }
    for (prefill, decode) in [(1, 3), (2, 2)] {
        let out = tokio::task::spawn_blocking({
            let endpoint = endpoint.clone();
            let (p, d) = (prefill.to_string(), decode.to_string());
            move || {
                tandemctl(
                    &[
                        "rebalance",
                        "--prefill",
                        &p,
                        "--decode",
                        &d,
                        "--timeout",
                        "60",
                    ],
                    &endpoint,
                )
            }
        })
        .await
        .expect("rebalance ran");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(pool_sizes(&endpoint), (prefill, decode));
    }
    load.finish(&expected).await;

    // The role lives in etcd: prefill-1, moved to decode, restarts as a decode worker.
    let moved = json_of(&tandemctl(
        &["move", "prefill-1", "--to", "decode", "-o", "json"],
        &endpoint,
    ));
    assert_eq!(moved["role"], "decode");
    cluster.prefill[1].signal(Signal::SIGKILL);
    cluster.prefill[1].wait_exit(Duration::from_secs(5));
    let restarted = restart_worker(&builder, &model, "prefill-1", "prefill", "admin-rebalance");
    assert_eq!(role_of(restarted.url()).await, Role::Decode);
    wait_until_ready(&endpoint, "prefill-1", "decode");
}

/// Starts `tandem-<binary_role>-worker` again as worker `id` of `builder`'s cluster.
fn restart_worker(
    builder: &ClusterBuilder,
    model: &Path,
    id: &str,
    binary_role: &str,
    test: &str,
) -> Process {
    let mut args: Vec<OsString> = ["serve", "--listen", "127.0.0.1:0", "--worker-id", id]
        .iter()
        .map(OsString::from)
        .collect();
    args.extend([OsString::from("--model"), model.as_os_str().to_owned()]);
    args.extend(builder.registry_args());
    Process::start(
        &format!("{id}-restarted"),
        &binary(&format!("tandem-{binary_role}-worker")),
        &args,
        &log_dir(&format!("{test}-restarts")),
    )
}

/// Waits until `get workers` shows `id` ready in `role`.
fn wait_until_ready(endpoint: &str, id: &str, role: &str) {
    let deadline = Instant::now() + Duration::from_secs(TEST_LEASE_TTL_SECONDS + 10);
    loop {
        let listed = states(endpoint);
        let entry = listed.iter().find(|(i, _, _)| i == id);
        if entry.is_some_and(|(_, r, state)| r == role && state == "ready") {
            return;
        }
        assert!(Instant::now() < deadline, "{listed:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_worker_under_load_fails_no_request() {
    let Some(etcd) = Etcd::start("admin-rolling") else {
        return;
    };
    let model = fixture("qwen3-moe-f32");
    let builder = Cluster::builder("admin-rolling")
        .model(model.clone())
        .decode(2)
        .etcd(etcd.endpoint());
    let mut cluster = builder.clone().start();
    let endpoint = cluster.router.addr("grpc");
    let expected: Vec<Vec<u32>> = (0..8).map(|i| single_process(&model, i)).collect();
    wait_for_pools(&endpoint, (1, 2));
    let load = SteadyLoad::start(cluster.router_url());
    let mut replacements = Vec::new();
    for (id, role) in [
        ("decode-0", "decode"),
        ("decode-1", "decode"),
        ("prefill-0", "prefill"),
    ] {
        let worker = match id {
            "decode-0" => &mut cluster.decode[0],
            "decode-1" => &mut cluster.decode[1],
            _ => &mut cluster.prefill[0],
        };
        // SIGTERM: the worker deregisters, finishes its streams and exits 0.
        worker.signal(Signal::SIGTERM);
        let status = tokio::task::block_in_place(|| worker.wait_exit(Duration::from_secs(30)));
        assert!(
            status.is_some_and(|s| s.success()),
            "{id} exited {status:?}"
        );
        replacements.push(restart_worker(&builder, &model, id, role, "admin-rolling"));
        tokio::task::block_in_place(|| wait_until_ready(&endpoint, id, role));
    }
    load.finish(&expected).await;
}
