//! Entry points for the fuzz targets in `fuzz/` (and their regression tests): untrusted bytes
//! through what the router does to a request before it reaches a worker. Each panics only on
//! a broken invariant; refusing the input is a correct outcome.

use tandem_common::ids::RequestId;
use tandem_common::limits::Limits;
use tandem_proto::v1::GenerateRequest;

use crate::chat::ChatTemplate;
use crate::http::openai::{ChatCompletionRequest, CompletionRequest};
use crate::validation::{ModelCard, Validator};

/// Limits small enough that inputs reach them.
const MAX_PROMPT_TOKENS: u32 = 64;
const MAX_NEW_TOKENS: u32 = 32;

/// A router's request checks for one model, built from its tokenizer files.
pub struct Harness {
    validator: Validator,
}

impl Harness {
    /// From `tokenizer.json` and `tokenizer_config.json` (for the chat template).
    pub fn new(tokenizer_json: &[u8], tokenizer_config_json: &[u8]) -> Self {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json).expect("tokenizer");
        let chat_template =
            ChatTemplate::from_tokenizer_config(tokenizer_config_json).expect("chat template");
        let mut limits = Limits::defaults();
        limits.max_prompt_tokens = MAX_PROMPT_TOKENS;
        limits.max_new_tokens = MAX_NEW_TOKENS;
        Self {
            validator: Validator {
                card: ModelCard {
                    name: "fuzz".into(),
                    vocab_size: tokenizer.get_vocab_size(true) as u32,
                    max_position_embeddings: 128,
                    eos_token_ids: vec![0],
                    tokenizer,
                    chat_template,
                },
                limits,
                default_max_tokens: 8,
            },
        }
    }

    /// A `/v1/completions` body (`chat`: `/v1/chat/completions`) as the HTTP front door
    /// takes it: JSON, conversion (and chat template), validation.
    pub fn openai_body(&self, chat: bool, body: &[u8]) {
        let request = if chat {
            let Ok(request) = serde_json::from_slice::<ChatCompletionRequest>(body) else {
                return;
            };
            crate::http::chat_request(&self.validator.card, &request)
        } else {
            let Ok(request) = serde_json::from_slice::<CompletionRequest>(body) else {
                return;
            };
            crate::http::completion_request(&request)
        };
        if let Ok(request) = request {
            self.generate_request(request);
        }
    }

    /// A protobuf `GenerateRequest` as the gRPC front door takes it.
    pub fn grpc_message(&self, bytes: &[u8]) {
        if let Ok(request) = <GenerateRequest as prost::Message>::decode(bytes) {
            self.generate_request(request);
        }
    }

    /// Validation: accepted requests hold every limit.
    fn generate_request(&self, request: GenerateRequest) {
        let card = &self.validator.card;
        let Ok(valid) = self.validator.validate(request, RequestId("fuzz".into())) else {
            return;
        };
        assert!(!valid.prompt_ids.is_empty(), "an empty prompt was accepted");
        assert!(valid.prompt_ids.len() <= MAX_PROMPT_TOKENS as usize);
        assert!(valid.prompt_ids.iter().all(|&id| id < card.vocab_size));
        assert!((1..=MAX_NEW_TOKENS).contains(&valid.max_tokens));
        let s = &valid.sampling;
        for value in [s.temperature, s.top_p, s.min_p, s.repetition_penalty] {
            assert!(
                value.is_finite(),
                "a non-finite sampling value was accepted"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn harness() -> Harness {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/qwen3-moe-f32/"
        );
        let read = |name: &str| std::fs::read(format!("{dir}{name}")).expect("fixture");
        Harness::new(&read("tokenizer.json"), &read("tokenizer_config.json"))
    }

    /// The seed corpus (`fuzz/corpus`) and past findings run as tests, so a fix stays fixed.
    #[test]
    fn the_fuzz_corpus_runs_clean() {
        let harness = harness();
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus");
        let mut inputs = 0;
        type Run<'a> = &'a dyn Fn(&[u8]);
        let targets: [(&str, Run<'_>); 3] = [
            ("openai_completion", &|b| harness.openai_body(false, b)),
            ("openai_chat", &|b| harness.openai_body(true, b)),
            ("grpc_generate", &|b| harness.grpc_message(b)),
        ];
        for (target, run) in targets {
            let Ok(entries) = std::fs::read_dir(format!("{root}/{target}")) else {
                continue;
            };
            for entry in entries.flatten() {
                run(&std::fs::read(entry.path()).expect("corpus file"));
                inputs += 1;
            }
        }
        assert!(inputs >= 6, "{inputs} corpus inputs");
    }
}
