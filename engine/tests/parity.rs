//! The engine against Hugging Face transformers: reference logits and greedy continuations
//! made by tests/fixtures/generate.py and committed beside the tiny checkpoints.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
mod common;

use common::{FIXTURES, fixture_dir};
use tandem_engine::{
    CpuBackend, Engine, EngineConfig, Model, SamplingParams, SeqId, StopCriteria, Tokenizer,
    WeightDtype,
};

const F32_MAX_ABS_DIFF: f32 = 1e-4;
const BF16_MAX_REL_DIFF: f32 = 2e-2;

struct Case {
    ids: Vec<u32>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn read_reference(dir: &Path) -> Vec<Case> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid reference file");
    let ints = |name: &str| -> Vec<u32> {
        let t = st.tensor(name).expect(name);
        assert_eq!(t.dtype(), Dtype::I64);
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
            .collect()
    };
    let floats = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).expect(name);
        assert_eq!(t.dtype(), Dtype::F32);
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    (0..)
        .take_while(|i| st.tensor(&format!("prompt{i}.ids")).is_ok())
        .map(|i| Case {
            ids: ints(&format!("prompt{i}.ids")),
            logits: floats(&format!("prompt{i}.logits")),
            greedy: ints(&format!("prompt{i}.greedy")),
        })
        .collect()
}

fn engine(dir: &Path, config: EngineConfig) -> Engine<CpuBackend> {
    let model = Model::load(dir, CpuBackend, &mut |_| {}).expect("fixture loads");
    let tokenizer = Arc::new(Tokenizer::from_dir(dir).expect("fixture tokenizer"));
    Engine::new(model, Some(tokenizer), config).expect("engine")
}

fn greedy(max_new_tokens: usize) -> (SamplingParams, StopCriteria) {
    let stop = StopCriteria {
        ignore_eos: true,
        ..StopCriteria::max_new_tokens(max_new_tokens)
    };
    (SamplingParams::greedy(), stop)
}

#[test]
fn prefill_logits_match_transformers() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let mut engine = engine(&dir, EngineConfig::default());
        let bf16 = engine.model().config().dtype != WeightDtype::F32;
        for (i, case) in read_reference(&dir).iter().enumerate() {
            let ours = engine.score(&case.ids).expect("score");
            assert_eq!(ours.len(), case.logits.len(), "{name} prompt {i}");
            let max_abs = ours
                .iter()
                .zip(&case.logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            let scale = case.logits.iter().map(|v| v.abs()).fold(0.0, f32::max);
            eprintln!(
                "{name} prompt {i}: max abs diff {max_abs:.2e}, relative {:.2e}",
                max_abs / scale
            );
            if bf16 {
                let rel = max_abs / scale;
                assert!(
                    rel <= BF16_MAX_REL_DIFF,
                    "{name} prompt {i}: relative diff {rel}"
                );
            } else {
                assert!(
                    max_abs <= F32_MAX_ABS_DIFF,
                    "{name} prompt {i}: max abs diff {max_abs}"
                );
            }
            assert_eq!(engine.used_blocks(), 0, "score frees its blocks");
        }
    }
}

#[test]
fn greedy_continuations_match_transformers_one_by_one() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let mut engine = engine(&dir, EngineConfig::default());
        for (i, case) in read_reference(&dir).iter().enumerate() {
            let id = SeqId(i as u64);
            let (params, stop) = greedy(case.greedy.len());
            engine
                .add_request(id, case.ids.clone(), params, stop)
                .expect("add");
            let mut tokens = Vec::new();
            while engine.has_work() {
                tokens.extend(engine.step().expect("step").events.iter().map(|e| e.token));
            }
            assert_eq!(tokens, case.greedy, "{name} prompt {i}");
            assert_eq!(engine.used_blocks(), 0);
        }
    }
}

/// Sequences joining at different steps, with prompts split into chunks across steps, give
/// the same tokens as alone: batching must not change results.
#[test]
fn greedy_continuations_match_in_one_continuous_batch() {
    let join_step = [0, 0, 3, 7];
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let cases = read_reference(&dir);
        let config = EngineConfig {
            max_batch_tokens: 9,
            ..EngineConfig::default()
        };
        let mut engine = engine(&dir, config);
        let mut out: HashMap<SeqId, Vec<u32>> = HashMap::new();
        let last_join = join_step.iter().max().copied().unwrap_or_default();
        for step in 0.. {
            for (i, case) in cases.iter().enumerate() {
                if join_step[i % join_step.len()] == step {
                    let (params, stop) = greedy(case.greedy.len());
                    engine
                        .add_request(SeqId(i as u64), case.ids.clone(), params, stop)
                        .expect("add");
                }
            }
            if step > last_join && !engine.has_work() {
                break;
            }
            for e in engine.step().expect("step").events {
                out.entry(e.seq).or_default().push(e.token);
            }
        }
        for (i, case) in cases.iter().enumerate() {
            assert_eq!(out[&SeqId(i as u64)], case.greedy, "{name} prompt {i}");
        }
        assert_eq!(engine.used_blocks(), 0, "{name}: every block freed");
    }
}
