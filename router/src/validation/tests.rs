use tandem_proto::v1::{SamplingParams, TokenIds};

use super::*;

fn validator(max_prompt_tokens: u32, max_new_tokens: u32) -> Validator {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/qwen3-moe-f32/tokenizer.json"
    );
    let tokenizer = tokenizers::Tokenizer::from_file(path).expect("fixture tokenizer");
    let mut limits = Limits::defaults();
    limits.max_prompt_tokens = max_prompt_tokens;
    limits.max_new_tokens = max_new_tokens;
    Validator {
        card: ModelCard {
            name: "m".into(),
            vocab_size: 1024,
            max_position_embeddings: 64,
            eos_token_ids: vec![2],
            tokenizer,
            chat_template: None,
        },
        limits,
        default_max_tokens: 8,
    }
}

fn ids(n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
            ids: vec![5; n],
        })),
        max_tokens: Some(1),
        ..GenerateRequest::default()
    }
}

fn check(v: &Validator, r: GenerateRequest) -> Result<ValidGenerateRequest, String> {
    v.validate(r, RequestId("r".into()))
        .map_err(|e| e.to_string())
}

#[test]
fn prompt_length_limit_is_inclusive_and_the_message_names_it() {
    let v = validator(10, 100);
    assert!(check(&v, ids(9)).is_ok());
    assert!(check(&v, ids(10)).is_ok());
    let err = check(&v, ids(11)).unwrap_err();
    assert_eq!(
        err,
        "prompt has 11 tokens, over the limit of 10 (--max-prompt-tokens)"
    );
}

#[test]
fn max_tokens_limit_is_inclusive_zero_is_refused_and_unset_takes_the_default() {
    let v = validator(100, 5);
    let with = |n| GenerateRequest {
        max_tokens: n,
        ..ids(3)
    };
    assert_eq!(check(&v, with(Some(4))).expect("4").max_tokens, 4);
    assert_eq!(check(&v, with(Some(5))).expect("5").max_tokens, 5);
    let err = check(&v, with(Some(6))).unwrap_err();
    assert_eq!(
        err,
        "max_tokens must be between 1 and 5 (--max-new-tokens), got 6"
    );
    assert!(check(&v, with(Some(0))).unwrap_err().contains("got 0"));
    assert_eq!(
        check(&v, with(None)).expect("default").max_tokens,
        5,
        "the default is capped by the limit"
    );
}

#[test]
fn malformed_fields_are_named() {
    let v = validator(100, 100);
    let sampling = |s: SamplingParams| GenerateRequest {
        sampling: Some(s),
        ..ids(3)
    };
    let cases = [
        (
            sampling(SamplingParams {
                temperature: Some(f32::NAN),
                ..Default::default()
            }),
            "sampling.temperature must be a finite number >= 0, got NaN",
        ),
        (
            sampling(SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            }),
            "sampling.top_p must be in (0, 1], got 1.5",
        ),
        (
            sampling(SamplingParams {
                top_k: Some(0),
                ..Default::default()
            }),
            "sampling.top_k must be >= 1, got 0",
        ),
        (
            GenerateRequest {
                prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
                    ids: vec![1, 2, 4000],
                })),
                ..ids(0)
            },
            "token_ids[2] = 4000 is outside the vocabulary of 1024 tokens",
        ),
        (ids(0), "prompt is empty: it has 0 tokens"),
        (
            GenerateRequest {
                prompt: None,
                ..ids(1)
            },
            "prompt is missing: set `text` or `token_ids`",
        ),
        (
            GenerateRequest {
                model: "other".into(),
                ..ids(1)
            },
            "model `other` is not served here; this cluster serves `m`",
        ),
        (
            GenerateRequest {
                max_tokens: Some(40),
                ..ids(30)
            },
            "prompt of 30 tokens plus max_tokens 40 is 70, over the model's context of 64 tokens",
        ),
    ];
    for (request, message) in cases {
        assert_eq!(check(&v, request).unwrap_err(), message);
    }
}

#[test]
fn text_is_tokenized_and_an_unset_seed_is_drawn_per_request() {
    let v = validator(100, 100);
    let text = |t: &str| GenerateRequest {
        prompt: Some(generate_request::Prompt::Text(t.into())),
        ..ids(0)
    };
    let a = check(&v, text("Hello, Tandem")).expect("valid");
    assert_eq!(
        a.prompt_ids,
        v.card.encode("Hello, Tandem").expect("encodes")
    );
    let b = check(&v, text("Hello, Tandem")).expect("valid");
    assert_ne!(a.sampling.seed, b.sampling.seed);
    assert_eq!(check(&v, text("")).unwrap_err(), "text is empty");
}

fn any_float() -> impl proptest::strategy::Strategy<Value = f32> {
    use proptest::prelude::*;
    prop_oneof![
        any::<f32>(),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(-0.0),
        -3.0f32..3.0
    ]
}

proptest::proptest! {
    /// Arbitrary requests (any ids, any floats including NaN and infinities, any text) are
    /// either accepted within every limit or refused with INVALID_ARGUMENT or OUT_OF_RANGE,
    /// never a panic.
    #[test]
    fn arbitrary_requests_are_accepted_within_limits_or_refused_cleanly(
        ids in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..40),
        text in proptest::option::of("\\PC{0,60}"),
        max_tokens in proptest::option::of(proptest::prelude::any::<u32>()),
        temperature in proptest::option::of(any_float()),
        top_p in proptest::option::of(any_float()),
        min_p in proptest::option::of(any_float()),
        top_k in proptest::option::of(proptest::prelude::any::<u32>()),
        penalty in proptest::option::of(any_float()),
        top_logprobs in proptest::prelude::any::<u32>(),
        stop in proptest::collection::vec("\\PC{0,8}", 0..3),
    ) {
        let v = validator(32, 16);
        let request = GenerateRequest {
            prompt: Some(match text {
                Some(text) => generate_request::Prompt::Text(text),
                None => generate_request::Prompt::TokenIds(TokenIds { ids }),
            }),
            sampling: Some(SamplingParams {
                temperature,
                top_p,
                min_p,
                top_k,
                presence_penalty: penalty,
                frequency_penalty: penalty,
                repetition_penalty: penalty,
                ..SamplingParams::default()
            }),
            max_tokens,
            stop,
            logprobs: top_logprobs % 2 == 0,
            top_logprobs,
            ..GenerateRequest::default()
        };
        match v.validate(request, RequestId("p".into())) {
            Ok(valid) => {
                proptest::prop_assert!(!valid.prompt_ids.is_empty());
                proptest::prop_assert!(valid.prompt_ids.len() <= 32);
                proptest::prop_assert!(valid.prompt_ids.iter().all(|&id| id < v.card.vocab_size));
                proptest::prop_assert!((1..=16).contains(&valid.max_tokens));
                proptest::prop_assert!(valid.sampling.temperature.is_finite());
            }
            Err(e) => {
                let code = tonic::Status::from(e).code();
                proptest::prop_assert!(
                    matches!(code, tonic::Code::InvalidArgument | tonic::Code::OutOfRange),
                    "{code:?}"
                );
            }
        }
    }
}
