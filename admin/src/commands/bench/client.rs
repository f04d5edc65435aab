//! Sends one bench request over gRPC or OpenAI HTTP (server-sent events) and times it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tandem_proto::v1::{
    GenerateRequest, ModelInfoRequest, SamplingParams, TokenIds, generate_request,
    generate_response,
};

use super::super::InferenceRpc;
use super::CommandError;
use super::workload::BenchRequest;
use crate::args::BenchArgs;
use tandem_common::tls::Tls;

/// Where requests go.
#[derive(Debug, Clone)]
pub(crate) enum Client {
    Grpc {
        router: String,
        client: InferenceRpc,
    },
    Http(HttpEndpoint),
}

/// Where HTTP requests go: `host:port`, the API's base path (`/v1`), the `authorization`
/// value if any, and TLS for an https:// URL.
#[derive(Debug, Clone)]
pub(crate) struct HttpEndpoint {
    authority: String,
    base: String,
    authorization: Option<String>,
    tls: Option<Tls>,
}

/// What happened to one request, times from the start of its sweep point.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestTiming {
    pub error: Option<String>,
    pub sent: Duration,
    /// When each chunk of tokens arrived, and how many tokens it held (HTTP: 1 per event).
    pub chunks: Vec<(Duration, u32)>,
    pub done: Duration,
    pub output_tokens: u32,
}

impl RequestTiming {
    pub(crate) fn lost() -> Self {
        Self {
            error: Some("the request task ended without a result".into()),
            ..Self::default()
        }
    }

    pub(crate) fn ttft(&self) -> Option<Duration> {
        self.chunks
            .first()
            .map(|(t, _)| t.saturating_sub(self.sent))
    }
}

impl Client {
    pub(crate) async fn connect(args: &BenchArgs) -> Result<Self, CommandError> {
        if let Some(url) = &args.http {
            let tls = super::super::client_tls(&args.tls)?;
            let rest = match (url.split_once("://"), &tls) {
                (Some(("http", rest)), None) | (Some(("https", rest)), Some(_)) => rest,
                (Some(("https", _)), None) => {
                    return Err(CommandError::Usage(
                        "an https:// --http URL needs --tls-ca to verify the router".into(),
                    ));
                }
                (Some(("http", _)), Some(_)) => {
                    return Err(CommandError::Usage(
                        "--tls-ca is set but --http is http://; use https://".into(),
                    ));
                }
                _ => {
                    return Err(CommandError::Usage(format!(
                        "--http must be http(s)://HOST:PORT/v1, got {url}"
                    )));
                }
            };
            let (authority, base) = match rest.split_once('/') {
                Some((a, b)) => (a.to_owned(), format!("/{}", b.trim_end_matches('/'))),
                None => (rest.to_owned(), String::new()),
            };
            return Ok(Self::Http(HttpEndpoint {
                authority,
                base,
                authorization: args.api_key.as_ref().map(|k| format!("Bearer {k}")),
                tls,
            }));
        }
        let router = args.router.clone();
        let client =
            super::super::inference_client(&router, args.api_key.as_deref(), &args.tls).await?;
        Ok(Self::Grpc { router, client })
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Grpc { router, .. } => format!("grpc {router}"),
            Self::Http(endpoint) => {
                let scheme = if endpoint.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("http {scheme}://{}{}", endpoint.authority, endpoint.base)
            }
        }
    }

    /// The served model's vocabulary size, to draw prompt ids from.
    pub(crate) async fn vocab_size(&self) -> Result<u32, CommandError> {
        match self {
            Self::Grpc { router, client } => Ok(client
                .clone()
                .model_info(ModelInfoRequest {})
                .await
                .map_err(|status| CommandError::Rpc {
                    router: router.clone(),
                    status,
                })?
                .into_inner()
                .vocab_size),
            Self::Http(endpoint) => {
                let models = get_json(endpoint, &format!("{}/models", endpoint.base)).await?;
                models["data"][0]["vocab_size"]
                    .as_u64()
                    .map(|v| v as u32)
                    .ok_or_else(|| {
                        CommandError::Usage(format!(
                            "{}{}/models names no vocab_size",
                            endpoint.authority, endpoint.base
                        ))
                    })
            }
        }
    }

    /// Sends `request` greedily with end-of-sequence ignored, so it yields exactly its
    /// `max_tokens`; never fails, an error is recorded in the timing.
    pub(crate) async fn send(&self, request: &BenchRequest, started: Instant) -> RequestTiming {
        let mut timing = RequestTiming {
            sent: started.elapsed(),
            ..RequestTiming::default()
        };
        let result = match self {
            Self::Grpc { client, .. } => grpc(client.clone(), request, started, &mut timing).await,
            Self::Http(endpoint) => http(endpoint, request, started, &mut timing).await,
        };
        timing.done = started.elapsed();
        if let Err(error) = result {
            timing.error = Some(error);
        }
        timing
    }
}

async fn grpc(
    mut client: InferenceRpc,
    request: &BenchRequest,
    started: Instant,
    timing: &mut RequestTiming,
) -> Result<(), String> {
    let request = GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
            ids: request.prompt_ids.clone(),
        })),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        max_tokens: Some(request.max_tokens),
        ignore_eos: true,
        ..GenerateRequest::default()
    };
    let mut stream = client
        .generate(request)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
    {
        match message.kind {
            Some(generate_response::Kind::Chunk(chunk)) => {
                let n = chunk.token_ids.len() as u32;
                timing.chunks.push((started.elapsed(), n));
                timing.output_tokens += n;
            }
            Some(generate_response::Kind::Final(_)) => return Ok(()),
            Some(generate_response::Kind::Error(e)) => {
                return Err(format!("{}: {}", e.code, e.message));
            }
            None => {}
        }
    }
    Err("the stream ended without a final message".into())
}

/// One HTTP/1.1 request on its own connection; returns the response to read frames from.
async fn post(
    endpoint: &HttpEndpoint,
    path: &str,
    method: hyper::Method,
    body: String,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let authority = &endpoint.authority;
    let stream = tandem_common::tls::connect(authority, endpoint.tls.as_ref())
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(value) = &endpoint.authorization {
        request = request.header(hyper::header::AUTHORIZATION, value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("http request: {e}"))
}

async fn get_json(endpoint: &HttpEndpoint, path: &str) -> Result<Value, CommandError> {
    let response = post(endpoint, path, hyper::Method::GET, String::new())
        .await
        .map_err(CommandError::Usage)?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| CommandError::Usage(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| CommandError::Usage(format!("{path}: {e}")))
}

async fn http(
    endpoint: &HttpEndpoint,
    request: &BenchRequest,
    started: Instant,
    timing: &mut RequestTiming,
) -> Result<(), String> {
    let body = json!({
        "prompt": request.prompt_ids,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let path = format!("{}/completions", endpoint.base);
    let mut response = post(endpoint, &path, hyper::Method::POST, body.to_string()).await?;
    let status = response.status();
    let mut pending = String::new();
    while let Some(frame) = response.body_mut().frame().await {
        let frame = frame.map_err(|e| format!("reading the stream: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(payload) = line.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if payload == "[DONE]" {
                return Ok(());
            }
            let event: Value = serde_json::from_str(payload).map_err(|e| e.to_string())?;
            if let Some(message) = event["error"]["message"].as_str() {
                return Err(message.to_owned());
            }
            if let Some(tokens) = event["usage"]["completion_tokens"].as_u64() {
                timing.output_tokens = tokens as u32;
            } else if event["choices"][0]["finish_reason"].is_null() {
                timing.chunks.push((started.elapsed(), 1));
            }
        }
    }
    if status.is_success() {
        Err("the stream ended without [DONE]".into())
    } else {
        Err(format!("HTTP {status}: {}", pending.trim()))
    }
}
