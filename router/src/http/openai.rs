//! OpenAI's request and response shapes, as far as Tandem serves them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A field that is one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `prompt` of a completion: text, one text in a list, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What completions and chat completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct CommonParams {
    #[serde(default)]
    pub model: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// vLLM's extension: keep generating past end-of-sequence tokens (benchmarks use it).
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CompletionRequest {
    pub prompt: PromptField,
    /// Top alternatives per token (0–5 in OpenAI's API); set means logprobs are returned.
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// A message's content: text, or parts of which the text ones are joined.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ChatMessageIn {
    pub role: String,
    pub content: Option<ContentField>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ChatCompletionRequest {
    pub messages: Vec<ChatMessageIn>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// OpenAI's error body.
pub(crate) fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    serde_json::json!({
        "error": {
            "message": message,
            "type": kind,
            "param": Value::Null,
            "code": code,
        }
    })
}
