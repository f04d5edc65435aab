//! OpenAI-compatible HTTP on the router: `POST /v1/completions`, `POST /v1/chat/completions`
//! (JSON or server-sent events) and `GET /v1/models`. Requests become `tandem.v1`
//! `GenerateRequest`s and run through the same admission, validation and orchestration as
//! gRPC calls, so every limit applies alike; errors come back in OpenAI's error shape with
//! the matching HTTP status.

pub(crate) mod openai;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tandem_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, SamplingParams, TokenIds, TokenLogprob,
    generate_request, generate_response,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::chat::ChatMessage;
use crate::service::{RouterState, TokenStream};
use crate::validation::ModelCard;
use openai::{
    ChatCompletionRequest, CommonParams, CompletionRequest, ContentField, PromptField, Usage,
    error_body,
};

/// The HTTP listener's connections (TLS already handled), as axum takes them.
pub(crate) struct Listener(pub(crate) tandem_common::tls::Incoming);

impl axum::serve::Listener for Listener {
    type Io = tandem_common::tls::Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(stream) = self.0.accept().await else {
                // The accepting task is gone only when the runtime stops.
                return std::future::pending().await;
            };
            if let Ok(peer) = stream.peer_addr() {
                return (stream, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The client's address, for rate limits without API keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// OpenAI's default sampling temperature (gRPC's default is greedy).
const OPENAI_DEFAULT_TEMPERATURE: f32 = 1.0;
/// Server-sent events buffered per stream before the router waits for the client.
const EVENT_BUFFER: usize = 16;

/// The HTTP routes, sharing the gRPC service's state; bodies over `max_body_bytes` get 413.
pub(crate) fn routes(state: Arc<RouterState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// A failed request in OpenAI's shape.
#[derive(Debug)]
pub(crate) struct HttpError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl HttpError {
    fn invalid(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message,
        }
    }

    fn body(&self) -> Value {
        error_body(&self.message, self.kind, self.code)
    }
}

impl From<Status> for HttpError {
    fn from(status: Status) -> Self {
        let (http, kind, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Code::NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                Some("resource_exhausted"),
            ),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error", None),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None),
        };
        Self {
            status: http,
            kind,
            code,
            message: status.message().to_owned(),
        }
    }
}

impl From<JsonRejection> for HttpError {
    fn from(rejection: JsonRejection) -> Self {
        // OpenAI answers an unreadable body with 400 (axum says 422 for a body of the wrong
        // shape).
        let status = match rejection.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        Self {
            status,
            kind: "invalid_request_error",
            code: None,
            message: rejection.body_text(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The calling client (see [`crate::gate::ClientGate::identify`]).
fn client(state: &RouterState, headers: &HeaderMap, peer: SocketAddr) -> Result<String, HttpError> {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state
        .gate
        .identify(authorization, Some(peer.ip()))
        .map_err(|e| HttpError::from(Status::from(e)))
}

/// A generation request's client, charged one request of its rate.
fn admit_client(
    state: &RouterState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(), HttpError> {
    let client = client(state, headers, peer)?;
    state.charge(&client).map_err(HttpError::from)
}

async fn models(
    State(state): State<Arc<RouterState>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, HttpError> {
    client(&state, &headers, peer)?;
    let card = &state.validator.card;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": card.name,
            "object": "model",
            "created": 0,
            "owned_by": "tandem",
            "max_model_len": card.max_position_embeddings,
            "vocab_size": card.vocab_size,
        }],
    })))
}

/// Which endpoint a request came in on; it decides the response's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

async fn completions(
    State(state): State<Arc<RouterState>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, HttpError> {
    admit_client(&state, &headers, peer)?;
    let Json(request) = body?;
    let generate = completion_request(&request)?;
    respond(state, Api::Completions, request.common, generate).await
}

/// The gRPC request a `/v1/completions` body stands for.
pub(crate) fn completion_request(
    request: &CompletionRequest,
) -> Result<GenerateRequest, HttpError> {
    if request.echo == Some(true) {
        return Err(HttpError::invalid("echo is not supported".into()));
    }
    if request.best_of.is_some_and(|b| b != 1) {
        return Err(HttpError::invalid("best_of must be 1".into()));
    }
    let prompt = match &request.prompt {
        PromptField::Text(text) => generate_request::Prompt::Text(text.clone()),
        PromptField::Texts(texts) if texts.len() == 1 => {
            generate_request::Prompt::Text(texts[0].clone())
        }
        PromptField::Texts(texts) => {
            return Err(HttpError::invalid(format!(
                "prompt must be one text, got a list of {}",
                texts.len()
            )));
        }
        PromptField::Tokens(ids) => {
            generate_request::Prompt::TokenIds(TokenIds { ids: ids.clone() })
        }
    };
    generate_request(
        &request.common,
        prompt,
        request.common.max_tokens,
        request.logprobs,
    )
}

async fn chat_completions(
    State(state): State<Arc<RouterState>>,
    ConnectInfo(ClientAddr(peer)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Result<Response, HttpError> {
    admit_client(&state, &headers, peer)?;
    let Json(request) = body?;
    let generate = chat_request(&state.validator.card, &request)?;
    respond(state, Api::Chat, request.common, generate).await
}

/// The gRPC request a `/v1/chat/completions` body stands for: its messages rendered through
/// the model's chat template.
pub(crate) fn chat_request(
    card: &ModelCard,
    request: &ChatCompletionRequest,
) -> Result<GenerateRequest, HttpError> {
    let template = card.chat_template.as_ref().ok_or_else(|| {
        HttpError::invalid(format!(
            "model `{}` has no chat template in its tokenizer_config.json; use /v1/completions",
            card.name
        ))
    })?;
    if request.messages.is_empty() {
        return Err(HttpError::invalid("messages must not be empty".into()));
    }
    let messages: Vec<ChatMessage> = request
        .messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: match &m.content {
                None => String::new(),
                Some(ContentField::Text(text)) => text.clone(),
                Some(ContentField::Parts(parts)) => parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .map(|p| p.text.as_str())
                    .collect(),
            },
        })
        .collect();
    let text = template.render(&messages).map_err(HttpError::invalid)?;
    let max_tokens = request.max_completion_tokens.or(request.common.max_tokens);
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => Some(top.unwrap_or(0)),
        (_, Some(top)) if top > 0 => {
            return Err(HttpError::invalid(
                "top_logprobs needs logprobs set to true".into(),
            ));
        }
        _ => None,
    };
    let prompt = generate_request::Prompt::Text(text);
    generate_request(&request.common, prompt, max_tokens, logprobs)
}

/// The gRPC request an OpenAI one stands for; `logprobs` is the number of alternatives asked
/// for, None when logprobs are not wanted.
fn generate_request(
    common: &CommonParams,
    prompt: generate_request::Prompt,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
) -> Result<GenerateRequest, HttpError> {
    if let Some(n) = common.n.filter(|&n| n != 1) {
        return Err(HttpError::invalid(format!(
            "n must be 1 (one choice per request), got {n}"
        )));
    }
    Ok(GenerateRequest {
        model: common.model.clone(),
        prompt: Some(prompt),
        sampling: Some(SamplingParams {
            temperature: Some(common.temperature.unwrap_or(OPENAI_DEFAULT_TEMPERATURE)),
            top_p: common.top_p,
            seed: common.seed,
            presence_penalty: common.presence_penalty,
            frequency_penalty: common.frequency_penalty,
            ..SamplingParams::default()
        }),
        max_tokens,
        stop: common
            .stop
            .clone()
            .map(|s| s.into_vec())
            .unwrap_or_default(),
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.unwrap_or(0),
        ignore_eos: common.ignore_eos,
        ..GenerateRequest::default()
    })
}

/// Runs `generate` and answers in `api`'s shape: one JSON body, or events as tokens come.
/// A failure before the first token is an HTTP error status either way.
async fn respond(
    state: Arc<RouterState>,
    api: Api,
    common: CommonParams,
    generate: GenerateRequest,
) -> Result<Response, HttpError> {
    let (request_id, mut tokens) = state.start_generation(generate, None).await?;
    let first = match tokens.next().await {
        Some(Err(status)) => return Err(status.into()),
        Some(Ok(first)) => first,
        None => {
            return Err(HttpError::from(Status::internal(
                "the stream ended at once",
            )));
        }
    };
    let shape = Shape::new(api, &state, &common.model, &request_id.0);
    if common.stream {
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream(shape, first, tokens, include_usage).into_response())
    } else {
        Ok(Json(whole(shape, first, tokens).await?).into_response())
    }
}

/// Builds response objects of one request in its endpoint's shape.
struct Shape {
    api: Api,
    state: Arc<RouterState>,
    id: String,
    model: String,
    created: u64,
    /// Bytes of text sent so far, for completions' `text_offset`.
    text_offset: usize,
}

impl Shape {
    fn new(api: Api, state: &Arc<RouterState>, asked_model: &str, request_id: &str) -> Self {
        let prefix = match api {
            Api::Completions => "cmpl",
            Api::Chat => "chatcmpl",
        };
        let model = if asked_model.is_empty() {
            state.validator.card.name.clone()
        } else {
            asked_model.to_owned()
        };
        Self {
            api,
            state: Arc::clone(state),
            id: format!("{prefix}-{request_id}"),
            model,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            text_offset: 0,
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.state
            .validator
            .card
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
    }

    /// The `logprobs` value of a choice for `ids` (null when none were asked for).
    fn logprobs(&mut self, ids: &[u32], logprobs: &[TokenLogprob]) -> Value {
        if logprobs.is_empty() {
            return Value::Null;
        }
        let texts: Vec<String> = ids.iter().map(|&id| self.token_text(id)).collect();
        let mut offsets = Vec::with_capacity(texts.len());
        for text in &texts {
            offsets.push(self.text_offset);
            self.text_offset += text.len();
        }
        let alternatives = |lp: &TokenLogprob| -> Vec<(String, f32)> {
            lp.top
                .iter()
                .map(|t| (self.token_text(t.token_id), t.logprob))
                .collect()
        };
        match self.api {
            Api::Chat => {
                let content: Vec<Value> = texts
                    .iter()
                    .zip(logprobs)
                    .map(|(text, lp)| {
                        let top: Vec<Value> = alternatives(lp)
                            .into_iter()
                            .map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()}))
                            .collect();
                        json!({
                            "token": text,
                            "logprob": lp.logprob,
                            "bytes": text.as_bytes(),
                            "top_logprobs": top,
                        })
                    })
                    .collect();
                json!({ "content": content })
            }
            Api::Completions => {
                let top: Vec<Value> = logprobs
                    .iter()
                    .map(|lp| {
                        let map: serde_json::Map<String, Value> = alternatives(lp)
                            .into_iter()
                            .map(|(t, l)| (t, json!(l)))
                            .collect();
                        Value::Object(map)
                    })
                    .collect();
                json!({
                    "tokens": texts,
                    "token_logprobs": logprobs.iter().map(|lp| lp.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    /// One streamed chunk: new text, or (with `finish`) the end.
    fn chunk(&self, text: &str, logprobs: Value, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.api {
            Api::Completions => json!({
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if finish.is_none() || !text.is_empty() {
                    delta.insert("content".into(), json!(text));
                }
                json!({
                    "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                })
            }
        };
        json!({
            "id": self.id, "object": self.chunk_object(), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    /// The usage chunk `stream_options.include_usage` asks for: no choices.
    fn usage_chunk(&self, usage: &Usage) -> Value {
        json!({
            "id": self.id, "object": self.chunk_object(), "created": self.created,
            "model": self.model, "choices": [], "usage": usage,
        })
    }

    /// The `object` of a streamed chunk.
    fn chunk_object(&self) -> &'static str {
        match self.api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        }
    }

    /// The whole response of a non-streaming request.
    fn whole(&self, text: &str, logprobs: Value, finish: &str, usage: &Usage) -> Value {
        let (object, choice) = match self.api {
            Api::Completions => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}),
            ),
            Api::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
            ),
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage,
        })
    }
}

fn finish_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// Reads the whole stream into one response.
async fn whole(
    mut shape: Shape,
    first: GenerateResponse,
    mut rest: TokenStream,
) -> Result<Value, HttpError> {
    let (mut text, mut ids, mut logprobs) = (String::new(), Vec::new(), Vec::new());
    let mut next = Some(Ok(first));
    while let Some(item) = next {
        match item?.kind {
            Some(generate_response::Kind::Chunk(chunk)) => {
                text.push_str(&chunk.text);
                ids.extend(chunk.token_ids);
                logprobs.extend(chunk.logprobs);
            }
            Some(generate_response::Kind::Final(last)) => {
                let usage = last.usage.unwrap_or_default();
                let usage = Usage::new(usage.prompt_tokens, usage.completion_tokens);
                let lp = shape.logprobs(&ids, &logprobs);
                return Ok(shape.whole(&text, lp, finish_reason(last.finish_reason), &usage));
            }
            // The status that follows says what went wrong.
            Some(generate_response::Kind::Error(_)) | None => {}
        }
        next = rest.next().await;
    }
    Err(HttpError::from(Status::internal(
        "the stream ended without a final message",
    )))
}

fn event(value: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(value.to_string()))
}

/// Streams the response as server-sent events, ending with `data: [DONE]`; an error after
/// the first token is sent as one event in OpenAI's error shape. Dropping the response (the
/// client went away) drops the token stream, which cancels the request on the workers.
fn stream(
    mut shape: Shape,
    first: GenerateResponse,
    mut rest: TokenStream,
    include_usage: bool,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (out, events) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let mut next = Some(Ok(first));
        let mut first_chunk = true;
        while let Some(item) = next {
            let value = match item {
                Ok(GenerateResponse {
                    kind: Some(generate_response::Kind::Chunk(chunk)),
                }) => {
                    let lp = shape.logprobs(&chunk.token_ids, &chunk.logprobs);
                    let value = shape.chunk(&chunk.text, lp, None, first_chunk);
                    first_chunk = false;
                    Some(value)
                }
                Ok(GenerateResponse {
                    kind: Some(generate_response::Kind::Final(last)),
                }) => {
                    let end = shape.chunk(
                        "",
                        Value::Null,
                        Some(finish_reason(last.finish_reason)),
                        first_chunk,
                    );
                    if out.send(event(&end)).await.is_err() {
                        return;
                    }
                    let usage = last.usage.unwrap_or_default();
                    include_usage.then(|| {
                        shape.usage_chunk(&Usage::new(usage.prompt_tokens, usage.completion_tokens))
                    })
                }
                Ok(_) => None,
                Err(status) => Some(HttpError::from(status).body()),
            };
            if let Some(value) = value
                && out.send(event(&value)).await.is_err()
            {
                return;
            }
            next = rest.next().await;
        }
        let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(events))
}
