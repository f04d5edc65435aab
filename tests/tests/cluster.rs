//! The disaggregated cluster end to end: real router, prefill and decode processes on
//! loopback, real KV transfer over TCP, clients over gRPC.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_proto::internal::v1::worker_client::WorkerClient;
use tandem_proto::internal::v1::{StatsRequest, WorkerStats};
use tandem_proto::v1::inference_client::InferenceClient;
use tandem_proto::v1::{
    FinishReason, GenerateRequest, ModelInfoRequest, SamplingParams, TokenIds, generate_request,
    generate_response,
};
use tandem_tests::{Cluster, binary, fixture};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long stats may take to show freed blocks after a cancellation.
const FREE_WITHIN: Duration = Duration::from_secs(5);

const FIXTURES: &[&str] = &[
    "qwen3-moe-f32",
    "qwen3-moe-tied-bf16",
    "mixtral-f32-sharded",
    "mixtral-bf16",
    "qwen2-moe-f32",
    "qwen2-moe-bf16",
];

async fn client(url: String) -> InferenceClient<Channel> {
    InferenceClient::connect(url)
        .await
        .expect("router reachable")
}

fn ids_request(ids: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids })),
        max_tokens: Some(max_tokens),
        ..GenerateRequest::default()
    }
}

/// A completion's tokens and finish reason, or the status that ended it.
async fn generate(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> Result<(Vec<u32>, FinishReason), Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.kind {
            Some(generate_response::Kind::Chunk(chunk)) => tokens.extend(chunk.token_ids),
            Some(generate_response::Kind::Final(done)) => {
                let usage = done.usage.expect("usage");
                assert_eq!(usage.completion_tokens as usize, tokens.len());
                let finish = FinishReason::try_from(done.finish_reason).expect("reason");
                return Ok((tokens, finish));
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    panic!("stream ended without a final message")
}

/// Greedy tokens of `tandemctl generate` in one process.
fn single_process(model: &Path, prompt: &[u32], max_tokens: u32) -> Vec<u32> {
    single_process_with(model, prompt, max_tokens, &[])
}

/// [`single_process`] with more `tandemctl generate` flags.
fn single_process_with(model: &Path, prompt: &[u32], max_tokens: u32, flags: &[&str]) -> Vec<u32> {
    tandem_tests::single_process_tokens(model, prompt, max_tokens, flags)
}

/// 32 prompts of mixed lengths (1 to 94 tokens) and lengths of output (1 to 24 tokens).
fn mixed_requests(seed: u32) -> Vec<(Vec<u32>, u32)> {
    (0..32u32)
        .map(|i| {
            let len = 1 + (i * 37 + seed) % 94;
            let prompt = (0..len)
                .map(|j| 3 + (j * 101 + i * 7 + seed) % 1000)
                .collect();
            (prompt, 1 + (i * 5 + seed) % 24)
        })
        .collect()
}

async fn stats(url: String) -> WorkerStats {
    WorkerClient::connect(url)
        .await
        .expect("worker reachable")
        .stats(StatsRequest {})
        .await
        .expect("stats")
        .into_inner()
}

/// Polls a worker's stats until no KV block is in use, failing after [`FREE_WITHIN`].
async fn wait_blocks_freed(url: String) {
    let deadline = Instant::now() + FREE_WITHIN;
    loop {
        let s = stats(url.clone()).await;
        if s.kv_blocks_used == 0 && s.running_sequences == 0 && s.pending_transfers == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "blocks still held after {FREE_WITHIN:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends the 32 [`mixed_requests`] of `seed` at once and checks each against a single-process
/// run: same tokens, same finish reason; then every worker's blocks are freed.
async fn assert_matches_single_process(cluster: &Cluster, model: &Path, name: &str, seed: u32) {
    let requests = mixed_requests(seed);
    let calls = requests.iter().map(|(prompt, max_tokens)| {
        let url = cluster.router_url();
        let request = ids_request(prompt.clone(), *max_tokens);
        tokio::spawn(async move { generate(&mut client(url).await, request).await })
    });
    let results = futures_util::future::join_all(calls).await;
    for ((prompt, max_tokens), result) in requests.iter().zip(results) {
        let (tokens, finish) = result.expect("task").expect("completion");
        let expected = single_process(model, prompt, *max_tokens);
        assert_eq!(
            tokens,
            expected,
            "{name}: prompt of {} tokens, max_tokens {max_tokens}",
            prompt.len()
        );
        let by_length = tokens.len() == *max_tokens as usize && tokens.last() != Some(&2);
        assert_eq!(
            finish == FinishReason::Length,
            by_length,
            "{name}: {finish:?}"
        );
    }
    for worker in cluster.decode.iter().chain(&cluster.prefill) {
        wait_blocks_freed(worker.url()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_greedy_tokens_equal_single_process_for_32_concurrent_requests() {
    for (n, name) in FIXTURES.iter().enumerate() {
        let model = fixture(name);
        // Two of each on the first model, so choice between workers is exercised too.
        let workers = if n == 0 { 2 } else { 1 };
        let cluster = Cluster::builder(&format!("exactness-{name}"))
            .model(model.clone())
            .prefill(workers)
            .decode(workers)
            .start();
        assert_matches_single_process(&cluster, &model, name, n as u32).await;
    }
}

/// Prefill split over 2 tensor-parallel ranks, decode over 2 expert-parallel ranks: the KV
/// a prefill group assembles from its ranks' head slices lands on one decode rank, and the
/// tokens are still exactly the single-process ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_prefill_and_expert_parallel_decode_keep_tokens_exact() {
    for (n, name) in ["qwen3-moe-f32", "qwen2-moe-f32"].iter().enumerate() {
        let model = fixture(name);
        let cluster = Cluster::builder(&format!("parallel-{name}"))
            .model(model.clone())
            .prefill_args(&["--tp", "2"])
            .decode_args(&["--ep", "2"])
            .start();
        assert_matches_single_process(&cluster, &model, name, 7 + n as u32).await;
        let decode = stats(cluster.decode[0].url()).await;
        assert_eq!(decode.ranks.len(), 2, "{name}: one load entry per rank");
        assert!(
            decode.expert_load.iter().all(|&pairs| pairs > 0),
            "{name}: every expert ran: {:?}",
            decode.expert_load
        );
        let prefill = stats(cluster.prefill[0].url()).await;
        assert_eq!(
            prefill.ranks.len(),
            1,
            "{name}: a tensor-parallel group is one rank"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_the_right_code_at_limit_minus_one_limit_and_plus_one() {
    const MAX_MESSAGE: usize = 300;
    let cluster = Cluster::builder("limits")
        .model(fixture("qwen3-moe-f32"))
        .router_args(&[
            "--max-prompt-tokens",
            "10",
            "--max-new-tokens",
            "4",
            "--max-message-bytes",
            &MAX_MESSAGE.to_string(),
        ])
        .start();
    let mut c = client(cluster.router_url()).await;
    for (len, ok) in [(9, true), (10, true), (11, false)] {
        let result = generate(&mut c, ids_request(vec![7; len], 1)).await;
        if ok {
            assert!(result.is_ok(), "{len} tokens: {result:?}");
        } else {
            let status = result.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(
                status.message(),
                "prompt has 11 tokens, over the limit of 10 (--max-prompt-tokens)"
            );
        }
    }
    for (max_tokens, ok) in [(3, true), (4, true), (5, false)] {
        let result = generate(&mut c, ids_request(vec![7; 3], max_tokens)).await;
        match result {
            Ok((tokens, _)) => {
                assert!(ok, "max_tokens {max_tokens} must be refused");
                assert!(tokens.len() <= max_tokens as usize);
            }
            Err(status) => {
                assert!(!ok, "max_tokens {max_tokens}: {status:?}");
                assert_eq!(status.code(), Code::InvalidArgument);
                assert_eq!(
                    status.message(),
                    "max_tokens must be between 1 and 4 (--max-new-tokens), got 5"
                );
            }
        }
    }
    // Message size: a text prompt padded so the encoded request is limit-1, limit, limit+1.
    let encoded_len = |r: &GenerateRequest| prost::Message::encoded_len(r);
    for (size, ok) in [
        (MAX_MESSAGE - 1, true),
        (MAX_MESSAGE, true),
        (MAX_MESSAGE + 1, false),
    ] {
        let mut request = GenerateRequest {
            prompt: Some(generate_request::Prompt::Text(String::new())),
            max_tokens: Some(1),
            ..GenerateRequest::default()
        };
        let base = encoded_len(&request);
        let mut text = String::new();
        while encoded_len(&request) < size {
            text.push('a');
            request.prompt = Some(generate_request::Prompt::Text(text.clone()));
        }
        assert_eq!(encoded_len(&request), size, "base {base}");
        let result = generate(&mut c, request).await;
        match result {
            Ok(_) => assert!(ok, "{size} bytes must be refused"),
            Err(status) if ok => {
                // At or under the size limit, only other checks may refuse it.
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            }
            Err(status) => {
                assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains(&format!("the limit is: {MAX_MESSAGE}")),
                    "{status:?}"
                );
            }
        }
    }
    // ModelInfo reports the limits requests are checked against.
    let info = c
        .model_info(ModelInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!((info.max_prompt_tokens, info.max_new_tokens), (10, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_invalid_argument_naming_the_field() {
    let cluster = Cluster::builder("malformed")
        .model(fixture("qwen3-moe-f32"))
        .start();
    let mut c = client(cluster.router_url()).await;
    let sampled = |s: SamplingParams| GenerateRequest {
        sampling: Some(s),
        ..ids_request(vec![5, 6], 2)
    };
    let cases: Vec<(GenerateRequest, Code, &str)> = vec![
        (
            ids_request(Vec::new(), 2),
            Code::InvalidArgument,
            "prompt is empty",
        ),
        (
            GenerateRequest {
                prompt: Some(generate_request::Prompt::Text(String::new())),
                ..ids_request(Vec::new(), 2)
            },
            Code::InvalidArgument,
            "text is empty",
        ),
        (
            GenerateRequest {
                model: "gpt-9".into(),
                ..ids_request(vec![5], 2)
            },
            Code::NotFound,
            "model `gpt-9` is not served here",
        ),
        (
            ids_request(vec![5, 1024], 2),
            Code::InvalidArgument,
            "token_ids[1] = 1024 is outside the vocabulary of 1024 tokens",
        ),
        (
            sampled(SamplingParams {
                temperature: Some(f32::NAN),
                ..Default::default()
            }),
            Code::InvalidArgument,
            "sampling.temperature must be a finite number >= 0, got NaN",
        ),
        (
            sampled(SamplingParams {
                top_p: Some(1.01),
                ..Default::default()
            }),
            Code::InvalidArgument,
            "sampling.top_p must be in (0, 1], got 1.01",
        ),
        (
            ids_request(vec![5], 0),
            Code::InvalidArgument,
            "max_tokens must be between 1 and",
        ),
        (
            GenerateRequest {
                prompt: None,
                ..ids_request(vec![5], 2)
            },
            Code::InvalidArgument,
            "prompt is missing",
        ),
    ];
    for (request, code, message) in cases {
        let status = generate(&mut c, request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }
    // Still serving after all of them.
    assert!(
        generate(&mut c, ids_request(vec![5, 6, 7], 3))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_frees_kv_blocks_on_both_workers() {
    let cluster = Cluster::builder("cancel")
        .model(fixture("qwen3-moe-f32"))
        .start();
    let mut c = client(cluster.router_url()).await;
    let request = GenerateRequest {
        ignore_eos: true,
        ..ids_request(vec![9; 40], 3000)
    };
    let mut stream = c.generate(request).await.expect("started").into_inner();
    let first = stream.message().await.expect("no error").expect("a token");
    assert!(matches!(
        first.kind,
        Some(generate_response::Kind::Chunk(_))
    ));
    let during = stats(cluster.decode[0].url()).await;
    assert!(
        during.kv_blocks_used > 0,
        "decode holds the sequence: {during:?}"
    );
    drop(stream);
    wait_blocks_freed(cluster.decode[0].url()).await;
    wait_blocks_freed(cluster.prefill[0].url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_that_never_arrives_times_out_and_frees_the_reservation() {
    let cluster = Cluster::builder("kv-timeout")
        .model(fixture("qwen3-moe-f32"))
        .decode_args(&["--kv-transfer-timeout-seconds", "1"])
        .start();
    // A hung prefill worker: its socket accepts, nothing answers.
    cluster.prefill[0].signal(Signal::SIGSTOP);
    let mut c = client(cluster.router_url()).await;
    let status = generate(&mut c, ids_request(vec![4; 20], 8))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("did not complete within 1s"),
        "{status:?}"
    );
    wait_blocks_freed(cluster.decode[0].url()).await;
    cluster.prefill[0].signal(Signal::SIGCONT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_and_queue_limits_refuse_at_once_and_time_out_waiters() {
    let cluster = Cluster::builder("admission")
        .model(fixture("qwen3-moe-f32"))
        .router_args(&[
            "--max-concurrent-requests",
            "1",
            "--queue-depth",
            "1",
            "--request-timeout-seconds",
            "2",
        ])
        .start();
    // Requests hang on a stopped prefill worker, so they stay in flight.
    cluster.prefill[0].signal(Signal::SIGSTOP);
    let url = cluster.router_url();
    let spawn = |url: String| {
        tokio::spawn(
            async move { generate(&mut client(url).await, ids_request(vec![4; 5], 2)).await },
        )
    };
    let running = spawn(url.clone());
    // In flight once the decode worker holds its reservation (the KV never comes).
    let deadline = Instant::now() + FREE_WITHIN;
    while stats(cluster.decode[0].url()).await.pending_transfers == 0 {
        assert!(
            Instant::now() < deadline,
            "first request never reached the decode worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // At the limit one more waits in the queue; beyond it (limit + 1) one is refused at once.
    let (second, third) = tokio::join!(spawn(url.clone()), spawn(url.clone()));
    let mut codes: Vec<(Code, String)> = [second, third]
        .into_iter()
        .map(|r| {
            let status = r.expect("task").unwrap_err();
            (status.code(), status.message().to_owned())
        })
        .collect();
    codes.sort_by_key(|(code, _)| *code as i32);
    assert_eq!(codes[0].0, Code::DeadlineExceeded, "{codes:?}");
    assert!(
        codes[0].1.contains("--request-timeout-seconds"),
        "{codes:?}"
    );
    assert_eq!(codes[1].0, Code::ResourceExhausted, "{codes:?}");
    assert!(codes[1].1.contains("--queue-depth 1"), "{codes:?}");
    let status = running.await.expect("task").unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    cluster.prefill[0].signal(Signal::SIGCONT);
    // Both slots are free again.
    assert!(
        generate(&mut client(url).await, ids_request(vec![4; 5], 2))
            .await
            .is_ok()
    );
}

#[test]
fn tandemctl_up_prints_the_address_then_ready_and_stops_on_sigterm() {
    let logs = tandem_tests::log_dir("up");
    let cache = logs.join("cache");
    let mut up = Command::new(binary("tandemctl"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--prefill",
            "1",
            "--decode",
            "1",
        ])
        .env("TANDEM_CACHE_DIR", &cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(logs.join("up.log")).expect("log"))
        .spawn()
        .expect("tandemctl up starts");
    let stdout = up.stdout.take().expect("stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let addr = lines.next().expect("address line").expect("utf-8");
    assert!(addr.parse::<std::net::SocketAddr>().is_ok(), "{addr}");
    let ready = lines.next().expect("ready line").expect("utf-8");
    assert!(ready.contains("ready"), "{ready}");
    assert!(
        ready.contains("OpenAI HTTP at http://127.0.0.1:"),
        "the ready line names the HTTP address: {ready}"
    );
    let out = Command::new(binary("tandemctl"))
        .args([
            "generate",
            "--router",
            &addr,
            "--prompt",
            "Hello, Tandem",
            "--max-tokens",
            "8",
        ])
        .args(["--output", "json"])
        .output()
        .expect("generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["token_ids"].as_array().map(Vec::len), Some(8));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(up.id()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("signal");
    let status = up.wait().expect("exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_answers_health_and_lists_its_services_by_reflection() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::builder("health")
        .model(fixture("qwen3-moe-f32"))
        .start();
    for (process, service) in [
        (&cluster.router, "tandem.v1.Inference"),
        (&cluster.prefill[0], "tandem.internal.v1.Prefill"),
        (&cluster.decode[0], "tandem.internal.v1.Decode"),
    ] {
        let channel = Channel::from_shared(process.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut health = HealthClient::new(channel.clone());
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service} on {} is SERVING", process.name);
        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection")
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = responses
            .message()
            .await
            .expect("response")
            .and_then(|r| r.message_response)
        else {
            panic!("no service list from {}", process.name)
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n == "tandem.v1.Inference"),
            "{names:?}"
        );
    }
}

/// Worker-level sampling that picks greedily.
fn greedy_sampling() -> tandem_proto::internal::v1::Sampling {
    tandem_proto::internal::v1::Sampling {
        top_p: 1.0,
        repetition_penalty: 1.0,
        ..Default::default()
    }
}

/// Asks `decode` to reserve blocks for `prompt` (greedy) whose KV a prefill worker will send:
/// the token stream and its ticket.
async fn reserve(
    decode: String,
    prompt: &[u32],
    max_tokens: u32,
) -> (
    tonic::Streaming<tandem_proto::internal::v1::DecodeResponse>,
    tandem_proto::internal::v1::KvTicket,
) {
    use tandem_proto::internal::v1::decode_client::DecodeClient;
    use tandem_proto::internal::v1::{DecodeRequest, decode_response};

    let mut client = DecodeClient::connect(decode).await.expect("connect");
    let mut stream = client
        .generate(DecodeRequest {
            request_id: "reserve".into(),
            prompt_ids: prompt.to_vec(),
            sampling: Some(greedy_sampling()),
            max_tokens,
            remote_prefill: true,
            ..DecodeRequest::default()
        })
        .await
        .expect("reserved")
        .into_inner();
    let Some(decode_response::Kind::Ticket(ticket)) =
        stream.message().await.expect("ticket").and_then(|m| m.kind)
    else {
        panic!("the first message is the ticket")
    };
    (stream, ticket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_kv_frame_fails_its_transfer_and_frees_the_reservation() {
    use tandem_common::ids::{KvBlockId, TransferId};
    use tandem_kv_transfer::{Frame, KvShape, LayerFrame, TcpKvSender};
    use tandem_proto::internal::v1::DescribeRequest;

    let cluster = Cluster::builder("bad-frame")
        .model(fixture("qwen3-moe-f32"))
        .prefill(0)
        .start();
    let decode = &cluster.decode[0];
    let described = WorkerClient::connect(decode.url())
        .await
        .expect("connect")
        .describe(DescribeRequest {})
        .await
        .expect("describe")
        .into_inner();
    let prompt = vec![5u32; 20];
    let (mut stream, ticket) = reserve(decode.url(), &prompt, 4).await;
    assert!(stats(decode.url()).await.kv_blocks_used > 0);
    // One KV head too many: the payload is self-consistent, the shape is not the model's.
    let shape = KvShape {
        num_tokens: prompt.len() as u32,
        kv_heads: described.num_kv_heads + 1,
        head_dim: described.head_dim,
    };
    let values = shape.values().expect("small");
    let frame = LayerFrame::from_f32(
        TransferId(ticket.transfer_id),
        0,
        shape,
        ticket.block_ids.iter().copied().map(KvBlockId).collect(),
        &vec![1.0; values],
        &vec![1.0; values],
    );
    let endpoint = ticket.endpoint.parse().expect("host:port");
    TcpKvSender::new(1 << 20, None)
        .send(endpoint, Frame::Layer(frame))
        .await
        .expect("sent");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("kv transfer {} failed", ticket.transfer_id))
            && status.message().contains("kv heads"),
        "{status:?}"
    );
    wait_blocks_freed(decode.url()).await;
}

/// Workers without a shareable cache (CPU) offer none, refuse a transfer that claims its KV
/// was written in place, and a prefill worker handed a cache on another device sends the KV
/// through the listener instead: the tokens are those of one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_goes_through_the_listener_when_no_cache_is_shared_on_this_device() {
    use tandem_common::ids::TransferId;
    use tandem_kv_transfer::{DoneFrame, Frame, TcpKvSender};
    use tandem_proto::internal::v1::PrefillRequest;
    use tandem_proto::internal::v1::prefill_client::PrefillClient;

    let model = fixture("qwen3-moe-f32");
    let cluster = Cluster::builder("shared-kv").model(model.clone()).start();
    let decode = cluster.decode[0].url();
    let prompt: Vec<u32> = (0..24).map(|i| 7 + i * 13).collect();

    let (mut stream, ticket) = reserve(decode.clone(), &prompt, 4).await;
    assert!(ticket.shared_kv.is_empty(), "a cpu worker shares no cache");
    let done = Frame::Done(DoneFrame {
        transfer: TransferId(ticket.transfer_id),
        first_token: 1,
        logprob: 0.0,
        top: Vec::new(),
        kv_in_place: true,
    });
    TcpKvSender::new(1 << 20, None)
        .send(ticket.endpoint.parse().expect("host:port"), done)
        .await
        .expect("sent");
    let status = stream.message().await.unwrap_err();
    assert!(status.message().contains("shares no cache"), "{status:?}");

    // A well-formed description of a cache on a device this worker does not have
    // ("TSKV", device uuid, block size, then one empty handle per layer).
    let layers = WorkerClient::connect(decode.clone())
        .await
        .expect("connect")
        .describe(tandem_proto::internal::v1::DescribeRequest {})
        .await
        .expect("describe")
        .into_inner()
        .num_layers;
    let mut elsewhere = 0x564B_5354u32.to_le_bytes().to_vec();
    elsewhere.extend([9u8; 16]);
    elsewhere.extend(16u32.to_le_bytes());
    elsewhere.extend(layers.to_le_bytes());
    for _ in 0..layers {
        elsewhere.extend(0u32.to_le_bytes());
    }
    let (mut stream, mut ticket) = reserve(decode, &prompt, 4).await;
    ticket.shared_kv = elsewhere;
    PrefillClient::connect(cluster.prefill[0].url())
        .await
        .expect("connect")
        .prefill(PrefillRequest {
            request_id: "elsewhere".into(),
            prompt_ids: prompt.clone(),
            sampling: Some(greedy_sampling()),
            ticket: Some(ticket),
        })
        .await
        .expect("prefilled through the listener");
    let mut tokens = Vec::new();
    while let Some(message) = stream.message().await.expect("tokens") {
        if let Some(tandem_proto::internal::v1::decode_response::Kind::Token(t)) = message.kind {
            tokens.push(t.token_id);
        }
    }
    assert_eq!(tokens, single_process(&model, &prompt, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_decode_worker_costs_a_retry_not_a_failed_request() {
    let model = fixture("qwen3-moe-f32");
    let cluster = Cluster::builder("crash-retry")
        .model(model.clone())
        .decode(2)
        .start();
    cluster.decode[1].signal(Signal::SIGKILL);
    let prompt = vec![8u32, 9, 10, 11];
    let expected = single_process(&model, &prompt, 6);
    let mut c = client(cluster.router_url()).await;
    for _ in 0..6 {
        let (tokens, _) = generate(&mut c, ids_request(prompt.clone(), 6))
            .await
            .expect("served by the surviving worker");
        assert_eq!(tokens, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_killed_mid_stream_migrates_the_stream_with_no_token_lost_or_repeated() {
    let model = fixture("qwen3-moe-f32");
    let cluster = Cluster::builder("migration")
        .model(model.clone())
        .decode(2)
        .start();
    let prompt: Vec<u32> = (0..12).map(|i| 5 + i * 31).collect();
    let max_tokens = 400;
    let expected = single_process_with(&model, &prompt, max_tokens, &["--ignore-eos"]);
    let mut request = ids_request(prompt, max_tokens);
    request.ignore_eos = true;
    let mut stream = client(cluster.router_url())
        .await
        .generate(request)
        .await
        .expect("stream")
        .into_inner();
    let mut tokens = Vec::new();
    let mut killed = false;
    loop {
        let message = stream
            .message()
            .await
            .expect("the stream survives the worker's death")
            .expect("a final message");
        match message.kind {
            Some(generate_response::Kind::Chunk(chunk)) => tokens.extend(chunk.token_ids),
            Some(generate_response::Kind::Final(done)) => {
                let usage = done.usage.expect("usage");
                assert_eq!(usage.completion_tokens as usize, tokens.len());
                assert_eq!(
                    usage.prompt_tokens, 12,
                    "the client's prompt, not the continuation's"
                );
                assert_eq!(done.finish_reason, FinishReason::Length as i32);
                break;
            }
            other => panic!("unexpected message {other:?}"),
        }
        if !killed && tokens.len() >= 10 {
            // Kill whichever decode worker runs the stream, mid-stream.
            for worker in &cluster.decode {
                if stats(worker.url()).await.running_sequences > 0 {
                    worker.signal(Signal::SIGKILL);
                    killed = true;
                    break;
                }
            }
            assert!(
                killed,
                "the stream ended before its decode worker could be killed"
            );
        }
    }
    assert_eq!(tokens.len(), expected.len());
    assert_eq!(
        tokens, expected,
        "no token lost or repeated across the move"
    );
}

/// Three groups of prompts sharing a 64-token prefix (4 blocks), four rounds, two prefill
/// workers: KV-aware routing computes each prefix once and then only the 8 new tokens of
/// each prompt; round-robin sends each group to both workers, which compute the prefix each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_routing_sends_each_prompt_where_its_prefix_is_cached() {
    const PREFIX: u32 = 64;
    const OWN: u32 = 8;
    let mut computed = Vec::new();
    for routing in ["kv-aware", "round-robin"] {
        let cluster = Cluster::builder(&format!("routing-{routing}"))
            .model(fixture("qwen3-moe-f32"))
            .prefill(2)
            .router_args(&["--routing", routing])
            .start();
        let url = cluster.router_url();
        for round in 0..4u32 {
            for group in 0..3u32 {
                let prompt: Vec<u32> = (0..PREFIX)
                    .map(|i| 3 + (i * 31 + group * 97) % 1000)
                    .chain((0..OWN).map(|i| 5 + (i * 13 + round * 7 + group) % 1000))
                    .collect();
                generate(&mut client(url.clone()).await, ids_request(prompt, 2))
                    .await
                    .expect("completion");
                // Lets the worker's cache events reach the router before the next prompt.
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        let mut total = 0;
        for worker in &cluster.prefill {
            total += stats(worker.url()).await.tokens_total;
        }
        computed.push(total);
        if routing == "kv-aware" {
            // A new prompt of group 0: one worker holds its 64-token prefix and is chosen.
            let ids: Vec<String> = (0..PREFIX + OWN)
                .map(|i| (3 + (i * 31) % 1000).to_string())
                .collect();
            let out = Command::new(binary("tandemctl"))
                .args([
                    "route",
                    "explain",
                    "-o",
                    "json",
                    "--endpoint",
                    &cluster.router.addr("grpc"),
                ])
                .args(["--prompt-ids", &ids.join(",")])
                .output()
                .expect("tandemctl runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let explained: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            let candidates = explained["candidates"].as_array().expect("candidates");
            let cached: Vec<u64> = candidates
                .iter()
                .map(|c| c["cached_tokens"].as_u64().expect("cached"))
                .collect();
            assert_eq!(cached.iter().sum::<u64>(), u64::from(PREFIX), "{explained}");
            let chosen: Vec<&serde_json::Value> =
                candidates.iter().filter(|c| c["chosen"] == true).collect();
            assert_eq!(chosen.len(), 1, "{explained}");
            assert_eq!(chosen[0]["cached_tokens"], PREFIX, "{explained}");
        }
    }
    let first_of_each_group = 3 * u64::from(PREFIX + OWN);
    assert_eq!(
        computed[0],
        first_of_each_group + 9 * u64::from(OWN),
        "kv-aware: each prefix computed once (round-robin computed {})",
        computed[1]
    );
    assert_eq!(
        computed[1],
        2 * first_of_each_group + 6 * u64::from(OWN),
        "round-robin: each prefix computed on both workers"
    );
}

/// With `--local-prefill-below 32`, a 10-token prompt is prefilled by the decode worker (the
/// prefill worker computes nothing) and a 40-token one by the prefill worker; both exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_prompts_prefill_on_the_decode_worker_when_the_operator_allows() {
    let model = fixture("qwen3-moe-f32");
    let cluster = Cluster::builder("local-prefill")
        .model(model.clone())
        .router_args(&["--local-prefill-below", "32"])
        .start();
    for (len, computed_by_prefill) in [(10u32, 0u64), (40, 40)] {
        let prompt: Vec<u32> = (0..len).map(|i| 3 + i * 11).collect();
        let (tokens, _) = generate(
            &mut client(cluster.router_url()).await,
            ids_request(prompt.clone(), 4),
        )
        .await
        .expect("completion");
        assert_eq!(
            tokens,
            single_process(&model, &prompt, 4),
            "prompt of {len}"
        );
        assert_eq!(
            stats(cluster.prefill[0].url()).await.tokens_total,
            computed_by_prefill,
            "prompt of {len}"
        );
    }
}
