//! The prefix cache: a prompt whose leading blocks an earlier prompt computed reuses them,
//! with the same tokens and the same exported KV as computing everything; cache events
//! replayed give exactly the cached set.

use std::collections::HashSet;
use std::path::Path;

use tandem_engine::{
    BlockHash, CpuBackend, Engine, EngineConfig, KvEvent, KvRows, Model, SamplingParams, SeqId,
    StopCriteria,
};

const BLOCK: usize = 16;

fn engine(prefix_caching: bool, num_blocks: usize) -> Engine<CpuBackend> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-moe-f32");
    let model = Model::load(&dir, CpuBackend, &mut |_| {}).expect("fixture loads");
    let config = EngineConfig {
        block_size: BLOCK,
        num_blocks,
        prefix_caching,
        ..EngineConfig::default()
    };
    Engine::new(model, None, config).expect("engine")
}

/// `shared` tokens every prompt of the family starts with, then `own` tokens of variant v.
fn prompt(shared: usize, own: usize, variant: u32) -> Vec<u32> {
    (0..shared as u32)
        .map(|i| 10 + i * 7 % 900)
        .chain((0..own as u32).map(|i| 20 + (i * 13 + variant * 101) % 900))
        .collect()
}

/// Runs one greedy request to its end: its tokens and the prompt tokens computed for it.
fn run(engine: &mut Engine<CpuBackend>, id: u64, prompt: Vec<u32>) -> (Vec<u32>, usize) {
    let stop = StopCriteria {
        ignore_eos: true,
        ..StopCriteria::max_new_tokens(6)
    };
    engine
        .add_request(SeqId(id), prompt, SamplingParams::greedy(), stop)
        .expect("add");
    let (mut tokens, mut computed) = (Vec::new(), 0);
    while engine.has_work() {
        let out = engine.step().expect("step");
        computed += out.prefill_tokens;
        tokens.extend(out.events.iter().map(|e| e.token));
    }
    (tokens, computed)
}

#[test]
fn a_cached_prefix_is_not_computed_again_and_changes_no_token() {
    let mut cached = engine(true, 64);
    let mut plain = engine(false, 64);
    // 50 shared tokens: 3 full blocks.
    for variant in 0..4u32 {
        let p = prompt(50, 9, variant);
        let (want, all) = run(&mut plain, u64::from(variant), p.clone());
        let (got, computed) = run(&mut cached, u64::from(variant), p.clone());
        assert_eq!(got, want, "variant {variant}");
        assert_eq!(all, p.len());
        let expected = if variant == 0 {
            p.len()
        } else {
            p.len() - 3 * BLOCK
        };
        assert_eq!(
            computed, expected,
            "variant {variant}: the 3 shared blocks come from the cache"
        );
        assert_eq!(
            cached.used_blocks(),
            0,
            "cached blocks no one holds count as free"
        );
    }
    assert_eq!(cached.cached_prompt_tokens(), 3 * 3 * BLOCK as u64);
    // A prompt that is exactly cached blocks still computes its last block, for its logits.
    let whole = prompt(48, 0, 0);
    let (want, _) = run(&mut plain, 10, whole.clone());
    let (got, computed) = run(&mut cached, 10, whole);
    assert_eq!(got, want);
    assert_eq!(computed, BLOCK);
}

#[test]
fn a_prefill_with_a_cached_prefix_exports_the_same_kv() {
    let export = |engine: &mut Engine<CpuBackend>, id: u64, p: Vec<u32>| {
        let mut layers: Vec<KvRows> = Vec::new();
        engine
            .add_prefill_request(SeqId(id), p, SamplingParams::greedy())
            .expect("add");
        while engine.has_work() {
            engine
                .step_exporting(&mut |kv| layers.push(kv.rows.clone()))
                .expect("step");
        }
        layers
    };
    let mut cached = engine(true, 64);
    let mut plain = engine(false, 64);
    export(&mut cached, 1, prompt(40, 5, 1));
    let second = prompt(40, 5, 2);
    let got = export(&mut cached, 2, second.clone());
    let want = export(&mut plain, 2, second);
    assert_eq!(got.len(), want.len());
    for (layer, (g, w)) in got.iter().zip(&want).enumerate() {
        let diff =
            g.k.iter()
                .chain(&g.v)
                .zip(w.k.iter().chain(&w.v))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "layer {layer}: exported kv differs by {diff}");
    }
}

#[test]
fn replaying_cache_events_gives_the_cached_set_through_evictions() {
    // 8 blocks: each request holds 2 to 4, so later ones evict earlier prefixes.
    let mut engine = engine(true, 8);
    let mut replayed: HashSet<BlockHash> = HashSet::new();
    let mut evictions = 0;
    for variant in 0..12u32 {
        run(
            &mut engine,
            u64::from(variant),
            prompt(16 * (1 + variant as usize % 3), 20, variant),
        );
        for event in engine.take_kv_events() {
            match event {
                KvEvent::Stored(hashes) => {
                    for h in hashes {
                        assert!(replayed.insert(h), "{h:?} stored twice");
                    }
                }
                KvEvent::Evicted(hashes) => {
                    evictions += hashes.len();
                    for h in hashes {
                        assert!(replayed.remove(&h), "{h:?} evicted but never stored");
                    }
                }
            }
        }
        let now: HashSet<BlockHash> = engine.cached_block_hashes().into_iter().collect();
        assert_eq!(replayed, now, "after request {variant}");
        assert_eq!(engine.used_blocks(), 0);
    }
    assert!(evictions > 0, "the small cache evicted something");
}
