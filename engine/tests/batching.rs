//! Continuous-batching lifecycle: admission waits for blocks, abort and finish free them, stop
//! conditions end sequences with the right reason.

use std::path::Path;
use std::sync::Arc;

use tandem_engine::{
    CpuBackend, Engine, EngineConfig, EngineError, FinishReason, Model, SamplingParams, SeqId,
    StopCriteria, Tokenizer,
};

const BLOCK: usize = 16;

fn engine(num_blocks: usize) -> Engine<CpuBackend> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-moe-f32");
    let model = Model::load(&dir, CpuBackend, &mut |_| {}).expect("fixture loads");
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir).expect("tokenizer"));
    let config = EngineConfig {
        block_size: BLOCK,
        num_blocks,
        ..EngineConfig::default()
    };
    Engine::new(model, Some(tokenizer), config).expect("engine")
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 10 + i * 7 % 900).collect()
}

fn stop_after(n: usize) -> StopCriteria {
    StopCriteria {
        ignore_eos: true,
        ..StopCriteria::max_new_tokens(n)
    }
}

#[test]
fn sequence_waits_for_blocks_and_runs_once_they_are_freed() {
    // Each request needs (20 + 12) / 16 = 2 blocks; three blocks fit one at a time.
    let mut engine = engine(3);
    for id in 0..2 {
        engine
            .add_request(
                SeqId(id),
                prompt(20),
                SamplingParams::greedy(),
                stop_after(12),
            )
            .expect("add");
    }
    engine.step().expect("step");
    assert_eq!((engine.num_running(), engine.num_waiting()), (1, 1));
    assert_eq!(engine.used_blocks(), 2);
    let mut finished = Vec::new();
    while engine.has_work() {
        for e in engine.step().expect("step").events {
            if let Some(reason) = e.finish {
                finished.push((e.seq, reason));
            }
        }
    }
    assert_eq!(
        finished,
        vec![
            (SeqId(0), FinishReason::Length),
            (SeqId(1), FinishReason::Length)
        ]
    );
    assert_eq!(engine.used_blocks(), 0);
}

#[test]
fn abort_frees_blocks_of_running_and_forgets_waiting_sequences() {
    let mut engine = engine(4);
    engine
        .add_request(
            SeqId(1),
            prompt(30),
            SamplingParams::greedy(),
            stop_after(30),
        )
        .expect("add");
    engine
        .add_request(
            SeqId(2),
            prompt(30),
            SamplingParams::greedy(),
            stop_after(30),
        )
        .expect("add");
    engine.step().expect("step");
    assert!(engine.used_blocks() > 0);
    assert!(engine.abort(SeqId(1)));
    assert!(engine.abort(SeqId(2)));
    assert!(!engine.abort(SeqId(2)), "second abort finds nothing");
    assert_eq!(engine.used_blocks(), 0);
    assert!(!engine.has_work());
}

#[test]
fn stop_token_ends_the_sequence_with_reason_stop() {
    let mut engine = engine(8);
    engine
        .add_request(SeqId(0), prompt(9), SamplingParams::greedy(), stop_after(6))
        .expect("add");
    let mut tokens = Vec::new();
    while engine.has_work() {
        tokens.extend(
            engine
                .step()
                .expect("step")
                .events
                .into_iter()
                .map(|e| e.token),
        );
    }
    let stop = StopCriteria {
        stop_token_ids: vec![tokens[2]],
        ..stop_after(6)
    };
    engine
        .add_request(SeqId(1), prompt(9), SamplingParams::greedy(), stop)
        .expect("add");
    let mut events = Vec::new();
    while engine.has_work() {
        events.extend(engine.step().expect("step").events);
    }
    let first_stop = tokens
        .iter()
        .position(|&t| t == tokens[2])
        .expect("present");
    assert_eq!(events.len(), first_stop + 1);
    assert_eq!(
        events.last().and_then(|e| e.finish),
        Some(FinishReason::Stop)
    );
}

#[test]
fn requests_beyond_limits_are_refused_with_the_numbers() {
    let mut engine = engine(2);
    let cases: Vec<(Vec<u32>, StopCriteria, &str)> = vec![
        (Vec::new(), stop_after(1), "prompt is empty"),
        (
            vec![5, 1024],
            stop_after(1),
            "token id 1024 is outside the vocabulary of 1024",
        ),
        (prompt(4), stop_after(0), "max_new_tokens must be >= 1"),
        (
            prompt(4),
            stop_after(4093),
            "is 4097, over the model's max_position_embeddings 4096",
        ),
        (prompt(20), stop_after(13), "needs 3 blocks, 2 free of 2"),
    ];
    for (p, stop, expected) in cases {
        let e = engine
            .add_request(SeqId(9), p, SamplingParams::greedy(), stop)
            .expect_err(expected);
        assert!(e.to_string().contains(expected), "{expected}: {e}");
    }
    // Exactly at the cache size is accepted.
    engine
        .add_request(
            SeqId(9),
            prompt(20),
            SamplingParams::greedy(),
            stop_after(12),
        )
        .expect("fits");
    let dup = engine.add_request(SeqId(9), prompt(2), SamplingParams::greedy(), stop_after(1));
    assert!(matches!(dup, Err(EngineError::DuplicateSequence(9))));
}
