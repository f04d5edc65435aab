//! Prefill on one engine, decode on another: the prompt KV exported layer by layer and
//! imported into reserved blocks gives the same tokens as one engine doing both.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tandem_engine::{
    CpuBackend, Engine, EngineConfig, EngineError, KvRows, Model, SamplingParams, SeqId,
    StopCriteria, Tokenizer,
};

fn engine(block_size: usize, max_batch_tokens: usize) -> Engine<CpuBackend> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-moe-f32");
    let model = Model::load(&dir, CpuBackend, &mut |_| {}).expect("fixture loads");
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir).expect("tokenizer"));
    let config = EngineConfig {
        block_size,
        num_blocks: 64,
        max_batch_tokens,
        ..EngineConfig::default()
    };
    Engine::new(model, Some(tokenizer), config).expect("engine")
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 5 + (i * 13 + salt) % 1000)
        .collect()
}

fn stop_after(n: usize) -> StopCriteria {
    StopCriteria {
        ignore_eos: true,
        ..StopCriteria::max_new_tokens(n)
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: Some(50),
        seed: Some(seed),
        ..SamplingParams::greedy()
    }
}

fn run_alone(prompt: &[u32], params: SamplingParams, n: usize) -> Vec<u32> {
    let mut engine = engine(16, 512);
    engine
        .add_request(SeqId(0), prompt.to_vec(), params, stop_after(n))
        .expect("request");
    let mut tokens = Vec::new();
    while engine.has_work() {
        tokens.extend(engine.step().expect("step").events.iter().map(|e| e.token));
    }
    tokens
}

/// Prefill every prompt on one engine (small chunks, other block size), ship the KV, decode on
/// another, and return each sequence's tokens.
fn run_split(prompts: &[(Vec<u32>, SamplingParams)], n: usize) -> Vec<Vec<u32>> {
    let mut prefill = engine(8, 24);
    let mut decode = engine(16, 512);
    let mut shipped: HashMap<(u64, usize), KvRows> = HashMap::new();
    for (i, (p, params)) in prompts.iter().enumerate() {
        let id = SeqId(i as u64);
        prefill
            .add_prefill_request(id, p.clone(), params.clone())
            .expect("prefill request");
        decode
            .reserve(id, p.clone(), params.clone(), stop_after(n))
            .expect("reserve");
    }
    let mut first = HashMap::new();
    while prefill.has_work() {
        let out = prefill
            .step_exporting(&mut |kv| {
                shipped.insert((kv.seq.0, kv.layer), kv.rows.clone());
            })
            .expect("prefill step");
        for event in out.events {
            assert!(
                (0..decode.model().config().num_layers)
                    .all(|l| shipped.contains_key(&(event.seq.0, l))),
                "every layer is exported before the first token"
            );
            first.insert(event.seq, event);
        }
    }
    assert_eq!(prefill.used_blocks(), 0, "prefill frees its blocks");
    let mut tokens = vec![Vec::new(); prompts.len()];
    for ((seq, layer), rows) in &shipped {
        decode.import_kv(SeqId(*seq), *layer, rows).expect("import");
    }
    for (id, event) in first {
        let admitted = decode
            .admit_prefilled(id, event.token, event.logprobs)
            .expect("admit");
        tokens[id.0 as usize].push(admitted.token);
    }
    while decode.has_work() {
        for e in decode.step().expect("decode step").events {
            tokens[e.seq.0 as usize].push(e.token);
        }
    }
    assert_eq!(decode.used_blocks(), 0, "decode frees its blocks");
    tokens
}

#[test]
fn split_prefill_and_decode_match_one_engine_greedy_and_seeded() {
    let prompts = vec![
        (prompt(5, 1), SamplingParams::greedy()),
        (prompt(37, 2), SamplingParams::greedy()),
        (prompt(16, 3), sampled(7)),
        (prompt(50, 4), sampled(99)),
    ];
    let split = run_split(&prompts, 6);
    for ((p, params), got) in prompts.iter().zip(&split) {
        assert_eq!(
            got,
            &run_alone(p, params.clone(), 6),
            "prompt of {}",
            p.len()
        );
    }
}

#[test]
fn import_rejects_wrong_sizes_unknown_sequences_and_early_admission() {
    let mut decode = engine(16, 512);
    let p = prompt(10, 0);
    decode
        .reserve(SeqId(1), p.clone(), SamplingParams::greedy(), stop_after(4))
        .expect("reserve");
    let width = {
        let c = decode.model().config();
        c.num_kv_heads * c.head_dim
    };
    let short = KvRows {
        k: vec![0.0; 9 * width],
        v: vec![0.0; 9 * width],
    };
    let err = decode.import_kv(SeqId(1), 0, &short).unwrap_err();
    assert!(err.to_string().contains("expected 10 tokens"), "{err}");
    let right = KvRows {
        k: vec![0.0; 10 * width],
        v: vec![0.0; 10 * width],
    };
    let layers = decode.model().config().num_layers;
    let err = decode.import_kv(SeqId(1), layers, &right).unwrap_err();
    assert!(err.to_string().contains("layers"), "{err}");
    assert!(matches!(
        decode.import_kv(SeqId(2), 0, &right),
        Err(EngineError::UnknownSequence(2))
    ));
    decode.import_kv(SeqId(1), 0, &right).expect("layer 0");
    let err = decode
        .admit_prefilled(
            SeqId(1),
            3,
            tandem_engine::Logprobs {
                chosen: 0.0,
                top: Vec::new(),
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("layer 1 has not arrived"), "{err}");
    assert!(decode.used_blocks() > 0);
    assert!(decode.abort(SeqId(1)), "a reservation can be aborted");
    assert_eq!(decode.used_blocks(), 0);
    assert_eq!(decode.num_reserved(), 0);
}
