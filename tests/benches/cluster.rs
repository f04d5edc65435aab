//! Cluster costs, as ratios measured in the same run:
//! - router overhead: requests/s and latency through the router (aggregated, and disaggregated
//!   with KV over TCP) against calling the decode worker's aggregated path directly;
//! - KV transfer: `tandem-kv-transfer` over TCP (frames encoded, sent, decoded, checked)
//!   against a plain loopback socket copy of the same bytes.
//!
//! Needs release binaries: `make bench` (or `cargo build --release --workspace --bins`, then
//! `cargo bench -p tandem-tests --bench cluster`; add `-- --quick` for fewer requests).

use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_common::ids::{KvBlockId, TransferId};
use tandem_kv_transfer::{Frame, KvListener, KvShape, LayerFrame, TcpKvSender};
use tandem_proto::internal::v1::decode_client::DecodeClient;
use tandem_proto::internal::v1::{DecodeRequest, Sampling, decode_response};
use tandem_proto::v1::inference_client::InferenceClient;
use tandem_proto::v1::{GenerateRequest, TokenIds, generate_request, generate_response};
use tandem_tests::{Cluster, fixture};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Concurrent clients in the request benchmarks.
const CONCURRENCY: usize = 8;
const PROMPT_TOKENS: u32 = 32;
const OUTPUT_TOKENS: u32 = 16;
/// One layer of one request's KV: 2048 tokens × 4 KV heads × 128 dims, f32 (8 MiB).
const KV_SHAPE: KvShape = KvShape {
    num_tokens: 2048,
    kv_heads: 4,
    head_dim: 128,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let requests = if quick { 64 } else { 256 };
    let frames = if quick { 16 } else { 64 };
    router_overhead(requests).await;
    kv_transfer(frames).await;
}

#[derive(Debug, Clone, Copy)]
struct Run {
    requests_per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs `requests` requests, `CONCURRENCY` at a time, each through `call`.
async fn measure<F, Fut>(requests: usize, call: F) -> Run
where
    F: Fn(u32) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel(requests);
    let per_client = requests / CONCURRENCY;
    for client in 0..CONCURRENCY {
        let call = call.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for i in 0..per_client {
                let t = Instant::now();
                call((client * per_client + i) as u32).await;
                let _ = tx.send(t.elapsed()).await;
            }
        });
    }
    drop(tx);
    let mut latencies = Vec::new();
    while let Some(l) = rx.recv().await {
        latencies.push(l);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Run {
        requests_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

fn prompt(i: u32) -> Vec<u32> {
    (0..PROMPT_TOKENS)
        .map(|j| 3 + (i * 31 + j * 7) % 1000)
        .collect()
}

async fn via_router(url: String, requests: usize) -> Run {
    let client = InferenceClient::connect(url).await.expect("router");
    measure(requests, move |i| {
        let mut client = client.clone();
        async move {
            let request = GenerateRequest {
                prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
                    ids: prompt(i),
                })),
                max_tokens: Some(OUTPUT_TOKENS),
                ignore_eos: true,
                ..GenerateRequest::default()
            };
            let mut stream = client
                .generate(request)
                .await
                .expect("generate")
                .into_inner();
            let mut tokens = 0;
            while let Some(m) = stream.message().await.expect("stream") {
                if let Some(generate_response::Kind::Chunk(c)) = m.kind {
                    tokens += c.token_ids.len() as u32;
                }
            }
            assert_eq!(tokens, OUTPUT_TOKENS);
        }
    })
    .await
}

async fn direct_to_decode(url: String, requests: usize) -> Run {
    let client = DecodeClient::connect(url).await.expect("decode worker");
    measure(requests, move |i| {
        let mut client = client.clone();
        async move {
            let request = DecodeRequest {
                request_id: format!("bench-{i}"),
                prompt_ids: prompt(i),
                sampling: Some(Sampling {
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    ..Sampling::default()
                }),
                max_tokens: OUTPUT_TOKENS,
                ignore_eos: true,
                ..DecodeRequest::default()
            };
            let mut stream = client
                .generate(request)
                .await
                .expect("generate")
                .into_inner();
            let mut tokens = 0;
            while let Some(m) = stream.message().await.expect("stream") {
                if let Some(decode_response::Kind::Token(_)) = m.kind {
                    tokens += 1;
                }
            }
            assert_eq!(tokens, OUTPUT_TOKENS);
        }
    })
    .await
}

async fn router_overhead(requests: usize) {
    let model = fixture("qwen3-moe-f32");
    let aggregated = Cluster::builder("bench-aggregated")
        .model(model.clone())
        .prefill(0)
        .start();
    let direct = direct_to_decode(aggregated.decode[0].url(), requests).await;
    let routed = via_router(aggregated.router_url(), requests).await;
    drop(aggregated);
    let disaggregated = Cluster::builder("bench-disaggregated").model(model).start();
    let split = via_router(disaggregated.router_url(), requests).await;
    drop(disaggregated);
    println!(
        "router overhead: qwen3-moe-f32 fixture, {requests} requests, {CONCURRENCY} concurrent, {PROMPT_TOKENS} prompt + {OUTPUT_TOKENS} output tokens"
    );
    println!("| path | requests/s | vs direct | p50 ms | p99 ms | added p50 ms |");
    println!("|---|---|---|---|---|---|");
    for (name, run) in [
        ("decode worker directly (aggregated)", direct),
        ("router → decode (aggregated)", routed),
        ("router → prefill → KV over TCP → decode", split),
    ] {
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {:.2} | {:+.2} |",
            run.requests_per_second,
            run.requests_per_second / direct.requests_per_second,
            ms(run.p50),
            ms(run.p99),
            ms(run.p50) - ms(direct.p50),
        );
    }
    println!();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn kv_transfer(frames: usize) {
    let values = KV_SHAPE.values().expect("fits");
    let k: Vec<f32> = (0..values).map(|i| i as f32).collect();
    let frame = LayerFrame::from_f32(
        TransferId(1),
        0,
        KV_SHAPE,
        (0..128).map(KvBlockId).collect(),
        &k,
        &k,
    );
    let frame_bytes = frame.payload.len();
    let total = (frame_bytes * frames) as f64;

    // Tandem's path: encode, send, decode and check every frame.
    let listener = KvListener::bind("127.0.0.1:0".parse().expect("addr"), 64 << 20, None)
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::channel(4);
    tokio::spawn(listener.run(tx));
    let sender = TcpKvSender::new(64 << 20, None);
    // Warm the connection.
    sender
        .send(addr, Frame::Layer(frame.clone()))
        .await
        .expect("send");
    rx.recv().await.expect("frame").expect("valid");
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        for _ in 0..frames {
            let received = rx.recv().await.expect("frame").expect("valid");
            std::hint::black_box(received);
        }
    });
    for _ in 0..frames {
        sender
            .send(addr, Frame::Layer(frame.clone()))
            .await
            .expect("send");
    }
    receiving.await.expect("receiver");
    let tandem = total / started.elapsed().as_secs_f64();

    // Baseline: the same bytes through a plain loopback socket, no framing.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let plain_addr = plain.local_addr().expect("addr");
    let payload: Bytes = frame.payload.clone();
    let reader = tokio::spawn(async move {
        let (mut socket, _) = plain.accept().await.expect("accept");
        let mut buf = vec![0u8; frame_bytes];
        for _ in 0..frames {
            socket.read_exact(&mut buf).await.expect("read");
        }
    });
    let mut socket = tokio::net::TcpStream::connect(plain_addr)
        .await
        .expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    let started = Instant::now();
    for _ in 0..frames {
        socket.write_all(&payload).await.expect("write");
    }
    reader.await.expect("reader");
    let baseline = total / started.elapsed().as_secs_f64();

    println!(
        "kv transfer: {frames} layer frames of {:.1} MiB ({} tokens × {} kv heads × {} dims, K and V, f32)",
        frame_bytes as f64 / (1 << 20) as f64,
        KV_SHAPE.num_tokens,
        KV_SHAPE.kv_heads,
        KV_SHAPE.head_dim
    );
    println!("| path | GB/s | vs plain socket |");
    println!("|---|---|---|");
    println!(
        "| plain loopback socket copy | {:.2} | 1.00 |",
        baseline / 1e9
    );
    println!(
        "| tandem-kv-transfer TCP (encode, send, decode, check) | {:.2} | {:.2} |",
        tandem / 1e9,
        tandem / baseline
    );
}
