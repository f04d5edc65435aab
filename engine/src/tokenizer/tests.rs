use std::path::Path;

use serde_json::json;

use super::*;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-moe-f32"),
    )
    .expect("fixture tokenizer")
}

/// Pushes every token of `text` and returns the emitted pieces and whether a stop matched.
fn stream(tok: &Tokenizer, text: &str, stops: &[&str]) -> (Vec<String>, bool) {
    let mut inc = IncrementalText::new(stops.iter().map(|s| s.to_string()).collect());
    let mut pieces = Vec::new();
    for id in tok.encode(text).expect("encode") {
        let (piece, stopped) = inc.push(tok, id).expect("push");
        pieces.push(piece);
        if stopped {
            return (pieces, true);
        }
    }
    pieces.push(inc.flush());
    (pieces, false)
}

#[test]
fn config_reads_eos_and_chat_template() {
    let tok = tokenizer();
    assert_eq!(tok.config().eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.eos_token_ids(), vec![2]);
    assert!(
        tok.config()
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("im_start"))
    );
    assert_eq!(tok.vocab_size(), 1024);
}

#[test]
fn config_accepts_object_tokens_and_template_lists() {
    let c = TokenizerConfig::from_json(&json!({
        "eos_token": {"content": "</s>", "special": true},
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    }));
    assert_eq!(c.eos_token.as_deref(), Some("</s>"));
    assert_eq!(c.chat_template.as_deref(), Some("D"));
}

#[test]
fn incremental_text_reassembles_the_decoded_text() {
    let tok = tokenizer();
    let text = "Streaming text, piece by piece: ünïcödé and 漢字 survive.";
    let (pieces, stopped) = stream(&tok, text, &[]);
    assert!(!stopped);
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')));
}

#[test]
fn stop_string_ends_text_before_the_match_and_is_never_emitted() {
    let tok = tokenizer();
    let (pieces, stopped) = stream(&tok, "alpha beta STOP gamma", &["STOP"]);
    assert!(stopped);
    assert_eq!(pieces.concat(), "alpha beta ");
    assert!(pieces.iter().all(|p| !p.contains("ST")), "{pieces:?}");
}

#[test]
fn partial_stop_prefix_is_released_when_it_does_not_complete() {
    let tok = tokenizer();
    let (pieces, stopped) = stream(&tok, "one STOx two", &["STOP"]);
    assert!(!stopped);
    assert_eq!(pieces.concat(), "one STOx two");
}
