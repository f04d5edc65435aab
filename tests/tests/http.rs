//! The router's OpenAI-compatible HTTP API over real sockets: shapes, streaming, error codes
//! and limits. (The official OpenAI SDK runs against it in tests/python/run.)

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use tandem_tests::{Cluster, binary, fixture};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request on a fresh connection; (status, body with chunked encoding undone).
async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_http(addr, &request).await
}

/// Sends `request` (a whole HTTP/1.1 request) on a fresh connection; (status, body).
async fn raw_http(addr: &str, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("router http reachable");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split(' ')
        .nth(1)
        .expect("status")
        .parse()
        .expect("code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// `tandemctl generate`'s text for `prompt` in one process (greedy).
fn single_process_text(model: &Path, prompt: &str, max_tokens: u32) -> String {
    let max_tokens = max_tokens.to_string();
    tandem_tests::single_process_json(model, &["--prompt", prompt, "--max-tokens", &max_tokens])
        ["text"]
        .as_str()
        .expect("text")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_chat_answer_in_openai_shapes_and_stream_the_same_text() {
    let model = fixture("qwen3-moe-f32");
    let cluster = Cluster::builder("http-shapes")
        .model(model.clone())
        .router_args(&["--http-listen", "127.0.0.1:0"])
        .start();
    let addr = cluster.router.addr("http");

    let (status, body) = http(&addr, "GET", "/v1/models", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["data"][0]["id"], "qwen3-moe-f32");

    let request = json!({"model": "qwen3-moe-f32", "prompt": "Once upon a time", "max_tokens": 6,
        "temperature": 0, "logprobs": 2});
    let (status, body) = http(&addr, "POST", "/v1/completions", &request.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let whole = json_of(&body);
    let text = whole["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_owned();
    assert_eq!(text, single_process_text(&model, "Once upon a time", 6));
    assert_eq!(whole["object"], "text_completion");
    let usage = &whole["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().expect("prompt")
                + usage["completion_tokens"].as_u64().expect("completion")
        )
    );
    let tokens = whole["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens");
    assert_eq!(
        tokens.len() as u64,
        usage["completion_tokens"].as_u64().expect("n")
    );
    assert!(
        whole["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .is_some_and(|top| top.len() <= 2 && !top.is_empty()),
        "{whole}"
    );

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (status, body) = http(&addr, "POST", "/v1/completions", &streaming.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let data = events(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| json_of(d)).collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);

    let chat = json!({"model": "qwen3-moe-f32", "max_completion_tokens": 5, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "stream": true});
    let (status, body) = http(&addr, "POST", "/v1/chat/completions", &chat.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let data = events(&body);
    let first = json_of(&data[0]);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let finish = data[..data.len() - 1]
        .iter()
        .map(|d| json_of(d))
        .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned));
    assert!(
        matches!(finish.as_deref(), Some("stop" | "length")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_with_matching_http_codes() {
    let cluster = Cluster::builder("http-errors")
        .model(fixture("qwen3-moe-f32"))
        .router_args(&[
            "--http-listen",
            "127.0.0.1:0",
            "--max-message-bytes",
            "2000",
        ])
        .start();
    let addr = cluster.router.addr("http");
    let cases: [(&str, Value, u16, &str); 5] = [
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 2}),
            400,
            "n must be 1",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}),
            404,
            "nope",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            "messages must not be empty",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x".repeat(3000)}),
            413,
            "",
        ),
    ];
    for (path, request, code, says) in cases {
        let (status, body) = http(&addr, "POST", path, &request.to_string()).await;
        assert_eq!(status, code, "{request}: {body}");
        if code == 413 {
            continue;
        }
        let error = &json_of(&body)["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains(says)),
            "{body}"
        );
        assert!(error["type"].is_string(), "{body}");
    }
    let (status, body) = http(&addr, "POST", "/v1/completions", "{not json").await;
    assert_eq!(status, 400, "{body}");
    assert!(json_of(&body)["error"]["message"].is_string(), "{body}");
}

/// `--api-key` and `--rate-limit-per-client` on both front doors: no key or a wrong one is
/// refused (UNAUTHENTICATED / 401), each key gets its own bucket of 2, and the third request
/// of a key is refused at once (RESOURCE_EXHAUSTED / 429) naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_per_client_rate_limits_guard_grpc_and_http() {
    let cluster = Cluster::builder("http-auth")
        .model(fixture("qwen3-moe-f32"))
        .router_args(&[
            "--http-listen",
            "127.0.0.1:0",
            "--api-key",
            "key-one,key-two",
            "--rate-limit-per-client",
            "0.001",
            "--rate-limit-burst",
            "2",
        ])
        .start();
    let grpc = cluster.router.addr("grpc");
    let generate = |key: Option<&str>| {
        let mut command = Command::new(binary("tandemctl"));
        command.args([
            "generate",
            "--router",
            &grpc,
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "2",
        ]);
        if let Some(key) = key {
            command.args(["--api-key", key]);
        }
        let out = command.output().expect("tandemctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = generate(None);
    assert!(
        !ok && err.contains("Unauthenticated") && err.contains("API key"),
        "{err}"
    );
    let (ok, err) = generate(Some("key-three"));
    assert!(!ok && err.contains("not valid"), "{err}");
    for _ in 0..2 {
        let (ok, err) = generate(Some("key-one"));
        assert!(ok, "{err}");
    }
    let (ok, err) = generate(Some("key-one"));
    assert!(
        !ok && err.contains("ResourceExhausted") && err.contains("--rate-limit-per-client"),
        "{err}"
    );

    let addr = cluster.router.addr("http");
    let request = json!({"prompt": "x", "max_tokens": 1}).to_string();
    let (status, body) = http(&addr, "POST", "/v1/completions", &request).await;
    assert_eq!(status, 401, "{body}");
    let with_key = |body: &str| {
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer key-two\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    for expected in [200, 200, 429] {
        let (status, body) = raw_http(&addr, &with_key(&request)).await;
        assert_eq!(status, expected, "{body}");
    }
}
