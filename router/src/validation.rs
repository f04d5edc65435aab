//! Checking a client's request against the served model and the router's limits, resolving
//! every default, into the [`ValidGenerateRequest`] the workers run.

use std::hash::{BuildHasher, RandomState};

use tandem_common::ids::RequestId;
use tandem_common::limits::Limits;
use tandem_proto::internal::v1::Sampling;
use tandem_proto::v1::{GenerateRequest, generate_request};

use crate::error::RouterError;

/// Most alternatives a request may ask logprobs for (the engine's limit).
pub(crate) const MAX_TOP_LOGPROBS: u32 = 20;
/// Largest |presence_penalty| and |frequency_penalty| (OpenAI's range).
const MAX_PENALTY: f32 = 2.0;

/// The served model as the workers describe it.
pub(crate) struct ModelCard {
    pub name: String,
    pub vocab_size: u32,
    pub max_position_embeddings: u32,
    pub eos_token_ids: Vec<u32>,
    pub tokenizer: tokenizers::Tokenizer,
    /// From `tokenizer_config.json`, for chat requests; None when the model has none.
    pub chat_template: Option<crate::chat::ChatTemplate>,
}

/// A request that passed every check, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValidGenerateRequest {
    pub request_id: RequestId,
    pub prompt_ids: Vec<u32>,
    pub sampling: Sampling,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: bool,
}

/// Checks requests against the model and the limits.
pub(crate) struct Validator {
    pub card: ModelCard,
    pub limits: Limits,
    pub default_max_tokens: u32,
}

fn invalid(message: String) -> RouterError {
    RouterError::Invalid(message)
}

impl ModelCard {
    /// Token ids of `text`, as the workers' tokenizer would give them.
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, RouterError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| RouterError::Internal(format!("tokenizing: {e}")))
    }
}

impl Validator {
    /// Validates `request`, tokenizing its text (CPU work: call it off the async threads).
    /// `request_id` is used when the request carries none.
    pub(crate) fn validate(
        &self,
        request: GenerateRequest,
        request_id: RequestId,
    ) -> Result<ValidGenerateRequest, RouterError> {
        if !request.model.is_empty() && request.model != self.card.name {
            return Err(RouterError::UnknownModel {
                asked: request.model,
                served: self.card.name.clone(),
            });
        }
        let max_tokens = self.max_tokens(request.max_tokens)?;
        let sampling = self.sampling(&request)?;
        for (i, &id) in request.stop_token_ids.iter().enumerate() {
            self.check_token(&format!("stop_token_ids[{i}]"), id)?;
        }
        let prompt_ids = match request.prompt {
            None => {
                return Err(invalid(
                    "prompt is missing: set `text` or `token_ids`".into(),
                ));
            }
            Some(generate_request::Prompt::Text(text)) => {
                if text.is_empty() {
                    return Err(invalid("text is empty".into()));
                }
                self.card.encode(&text)?
            }
            Some(generate_request::Prompt::TokenIds(ids)) => {
                for (i, &id) in ids.ids.iter().enumerate() {
                    self.check_token(&format!("token_ids[{i}]"), id)?;
                }
                ids.ids
            }
        };
        if prompt_ids.is_empty() {
            return Err(invalid("prompt is empty: it has 0 tokens".into()));
        }
        let limit = self.limits.max_prompt_tokens;
        if prompt_ids.len() > limit as usize {
            return Err(invalid(format!(
                "prompt has {} tokens, over the limit of {limit} (--max-prompt-tokens)",
                prompt_ids.len()
            )));
        }
        let total = prompt_ids.len() + max_tokens as usize;
        let context = self.card.max_position_embeddings;
        if total > context as usize {
            return Err(invalid(format!(
                "prompt of {} tokens plus max_tokens {max_tokens} is {total}, over the model's context of {context} tokens",
                prompt_ids.len()
            )));
        }
        Ok(ValidGenerateRequest {
            request_id: if request.request_id.is_empty() {
                request_id
            } else {
                RequestId(request.request_id)
            },
            prompt_ids,
            sampling,
            max_tokens,
            stop: request.stop,
            stop_token_ids: request.stop_token_ids,
            ignore_eos: request.ignore_eos,
            logprobs: request.logprobs,
        })
    }

    fn check_token(&self, field: &str, id: u32) -> Result<(), RouterError> {
        let vocab = self.card.vocab_size;
        if id >= vocab {
            return Err(invalid(format!(
                "{field} = {id} is outside the vocabulary of {vocab} tokens"
            )));
        }
        Ok(())
    }

    fn max_tokens(&self, asked: Option<u32>) -> Result<u32, RouterError> {
        let limit = self.limits.max_new_tokens;
        let max_tokens = asked.unwrap_or(self.default_max_tokens.min(limit));
        if max_tokens == 0 || max_tokens > limit {
            return Err(invalid(format!(
                "max_tokens must be between 1 and {limit} (--max-new-tokens), got {max_tokens}"
            )));
        }
        Ok(max_tokens)
    }

    fn sampling(&self, request: &GenerateRequest) -> Result<Sampling, RouterError> {
        let s = request.sampling.unwrap_or_default();
        let temperature = s.temperature.unwrap_or(0.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(invalid(format!(
                "sampling.temperature must be a finite number >= 0, got {temperature}"
            )));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid(format!(
                "sampling.top_p must be in (0, 1], got {top_p}"
            )));
        }
        let min_p = s.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(invalid(format!(
                "sampling.min_p must be in [0, 1], got {min_p}"
            )));
        }
        if s.top_k == Some(0) {
            return Err(invalid("sampling.top_k must be >= 1, got 0".into()));
        }
        let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(invalid(format!(
                "sampling.repetition_penalty must be a finite number > 0, got {repetition_penalty}"
            )));
        }
        let presence_penalty = s.presence_penalty.unwrap_or(0.0);
        let frequency_penalty = s.frequency_penalty.unwrap_or(0.0);
        for (field, value) in [
            ("presence_penalty", presence_penalty),
            ("frequency_penalty", frequency_penalty),
        ] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&value) {
                return Err(invalid(format!(
                    "sampling.{field} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}"
                )));
            }
        }
        if request.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}",
                request.top_logprobs
            )));
        }
        Ok(Sampling {
            temperature,
            top_k: s.top_k,
            top_p,
            min_p,
            // Prefill and decode workers must draw from the same seed for the first token and
            // the rest to follow one stream.
            seed: s.seed.unwrap_or_else(|| RandomState::new().hash_one(())),
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            top_logprobs: if request.logprobs {
                request.top_logprobs
            } else {
                0
            },
        })
    }
}

#[cfg(test)]
mod tests;
