//! Tensor-parallel and expert-parallel groups on the host collective (ranks as threads):
//! the sharded model must compute what the whole model computes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{FIXTURES, fixture_dir};
use tandem_engine::{
    Collective, CpuBackend, Engine, EngineConfig, EngineGroup, HostCollective, KvRows, Model,
    SamplingParams, SeqId, Sharding, StopCriteria, Tokenizer, load_ranks, load_tensor_parallel,
};

/// Summing partial products in another order moves f32 logits by rounding only.
const REDUCTION_ORDER_TOLERANCE: f32 = 1e-4;

fn comms(size: usize) -> Vec<Box<dyn Collective<CpuBackend>>> {
    HostCollective::group(size, Duration::from_secs(30))
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Collective<CpuBackend>>)
        .collect()
}

fn tokenizer(dir: &Path) -> Option<Arc<Tokenizer>> {
    Some(Arc::new(
        Tokenizer::from_dir(dir).expect("fixture tokenizer"),
    ))
}

fn single(dir: &Path, config: EngineConfig) -> Engine<CpuBackend> {
    let model = Model::load(dir, CpuBackend, &mut |_| {}).expect("fixture loads");
    Engine::new(model, tokenizer(dir), config).expect("engine")
}

fn tensor_parallel(dir: &Path, size: usize, config: EngineConfig) -> Engine<CpuBackend> {
    let model = load_tensor_parallel(dir, vec![CpuBackend; size], comms(size), &mut |_| {})
        .expect("tensor-parallel group loads");
    Engine::new(model, tokenizer(dir), config).expect("engine")
}

/// Deterministic prompts of 1 to 40 tokens.
fn prompts(count: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..count)
        .map(|i| {
            let len = 1 + (i * 7) % 40;
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn greedy(max_new_tokens: usize) -> (SamplingParams, StopCriteria) {
    let stop = StopCriteria {
        ignore_eos: true,
        ..StopCriteria::max_new_tokens(max_new_tokens)
    };
    (SamplingParams::greedy(), stop)
}

/// An engine or a group of them, driven the same way.
trait Generator {
    fn add(&mut self, id: SeqId, prompt: Vec<u32>, params: SamplingParams, stop: StopCriteria);
    fn has_work(&self) -> bool;
    fn step_tokens(&mut self) -> Vec<(SeqId, u32)>;
}

impl Generator for Engine<CpuBackend> {
    fn add(&mut self, id: SeqId, prompt: Vec<u32>, params: SamplingParams, stop: StopCriteria) {
        self.add_request(id, prompt, params, stop).expect("add");
    }

    fn has_work(&self) -> bool {
        Engine::has_work(self)
    }

    fn step_tokens(&mut self) -> Vec<(SeqId, u32)> {
        let events = self.step().expect("step").events;
        events.iter().map(|e| (e.seq, e.token)).collect()
    }
}

impl Generator for EngineGroup<CpuBackend> {
    fn add(&mut self, id: SeqId, prompt: Vec<u32>, params: SamplingParams, stop: StopCriteria) {
        self.add_request(id, prompt, params, stop).expect("add");
    }

    fn has_work(&self) -> bool {
        EngineGroup::has_work(self)
    }

    fn step_tokens(&mut self) -> Vec<(SeqId, u32)> {
        let events = self.step().expect("step").events;
        events.iter().map(|e| (e.seq, e.token)).collect()
    }
}

/// Runs every prompt to completion in one continuous batch; tokens per sequence.
fn generate(engine: &mut impl Generator, prompts: &[Vec<u32>]) -> HashMap<SeqId, Vec<u32>> {
    for (i, prompt) in prompts.iter().enumerate() {
        let (params, stop) = greedy(4 + i % 9);
        engine.add(SeqId(i as u64), prompt.clone(), params, stop);
    }
    let mut out: HashMap<SeqId, Vec<u32>> = HashMap::new();
    while engine.has_work() {
        for (seq, token) in engine.step_tokens() {
            out.entry(seq).or_default().push(token);
        }
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tensor_parallel_prefill_matches_one_rank() {
    let small_batches = EngineConfig {
        max_batch_tokens: 24,
        ..EngineConfig::default()
    };
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let mut reference = single(&dir, small_batches);
        let vocab = reference.model().config().vocab_size;
        let cases = prompts(12, vocab);
        let expected_tokens = generate(&mut reference, &cases);
        for size in [2, 4] {
            let mut group = tensor_parallel(&dir, size, small_batches);
            assert_eq!(
                group.model().local_kv_heads() * size.min(2),
                2,
                "{name} tp={size}"
            );
            for prompt in &cases[..4] {
                let diff = max_abs_diff(
                    &group.score(prompt).expect("score"),
                    &reference.score(prompt).expect("score"),
                );
                assert!(
                    diff <= REDUCTION_ORDER_TOLERANCE,
                    "{name} tp={size}: logits differ by {diff}"
                );
            }
            let tokens = generate(&mut group, &cases);
            assert_eq!(tokens, expected_tokens, "{name} tp={size}: greedy tokens");
            assert_eq!(group.used_blocks(), 0, "{name} tp={size}: blocks freed");
        }
    }
}

/// The prompt KV a tensor-parallel prefill exports holds every KV head, as one rank's does.
#[test]
fn tensor_parallel_export_assembles_whole_heads() {
    let dir = fixture_dir("qwen3-moe-f32");
    let prompt: Vec<u32> = (1..30).collect();
    let export = |engine: &mut Engine<CpuBackend>| {
        let mut layers: Vec<KvRows> = Vec::new();
        engine
            .add_prefill_request(SeqId(1), prompt.clone(), SamplingParams::greedy())
            .expect("add");
        while engine.has_work() {
            engine
                .step_exporting(&mut |kv| layers.push(kv.rows.clone()))
                .expect("step");
        }
        layers
    };
    let expected = export(&mut single(&dir, EngineConfig::default()));
    for size in [2, 4] {
        let got = export(&mut tensor_parallel(&dir, size, EngineConfig::default()));
        assert_eq!(got.len(), expected.len(), "tp={size}: one export per layer");
        for (layer, (g, e)) in got.iter().zip(&expected).enumerate() {
            let diff = max_abs_diff(&g.k, &e.k).max(max_abs_diff(&g.v, &e.v));
            assert!(
                diff <= REDUCTION_ORDER_TOLERANCE,
                "tp={size} layer {layer}: {diff}"
            );
        }
    }
}

#[test]
fn tensor_parallel_refuses_sizes_that_do_not_divide() {
    let dir = fixture_dir("qwen3-moe-f32");
    let Err(err) = load_tensor_parallel(&dir, vec![CpuBackend; 3], comms(3), &mut |_| {}) else {
        panic!("3 ranks cannot split 4 heads");
    };
    assert!(
        err.to_string().contains(
            "tensor parallelism 3 needs num_attention_heads divisible by 3, the model has 4"
        ),
        "{err}"
    );
}

fn expert_parallel(dir: &Path, size: usize, placement: Option<PathBuf>) -> EngineGroup<CpuBackend> {
    let sharding = Sharding {
        expert_parallel: size,
        expert_placement: placement,
        ..Sharding::default()
    };
    let models = load_ranks(dir, vec![CpuBackend; size], &sharding, &mut |_| {})
        .expect("expert-parallel group loads");
    EngineGroup::new(models, tokenizer(dir), EngineConfig::default()).expect("engines")
}

#[test]
fn expert_parallel_decode_matches_one_rank_and_counts_every_expert_pair() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let mut reference = single(&dir, EngineConfig::default());
        let config = reference.model().config().clone();
        let cases = prompts(16, config.vocab_size);
        let expected = generate(&mut reference, &cases);
        // Every token computed once per step: prompt tokens plus all generated but the last.
        let tokens_computed: usize = expected
            .iter()
            .map(|(id, out)| cases[id.0 as usize].len() + out.len() - 1)
            .sum();
        let sparse_layers = config.sparse_layers.iter().filter(|&&s| s).count();
        for size in [2, 4] {
            let mut group = expert_parallel(&dir, size, None);
            let tokens = generate(&mut group, &cases);
            assert_eq!(tokens, expected, "{name} ep={size}: greedy tokens");
            let ranks_used = group
                .ranks()
                .iter()
                .filter(|e| {
                    e.model()
                        .expert_load()
                        .expect("expert load")
                        .iter()
                        .sum::<u64>()
                        > 0
                })
                .count();
            assert_eq!(ranks_used, size, "{name} ep={size}: every rank ran experts");
            let pairs: u64 = group
                .ranks()
                .iter()
                .map(|e| {
                    e.model()
                        .expert_load()
                        .expect("expert load")
                        .iter()
                        .sum::<u64>()
                })
                .sum();
            assert_eq!(
                pairs as usize,
                tokens_computed * config.moe.experts_per_token * sparse_layers,
                "{name} ep={size}: expert load counters"
            );
            for (rank, engine) in group.ranks().iter().enumerate() {
                assert_eq!(engine.used_blocks(), 0, "{name} ep={size} rank {rank}");
                assert!(engine.num_running() == 0);
            }
        }
    }
}

#[test]
fn expert_placement_decides_which_rank_runs_each_expert() {
    let dir = fixture_dir("qwen3-moe-f32");
    // Rank 1 holds only expert 0; rank 0 the rest.
    let placement =
        std::env::temp_dir().join(format!("tandem-placement-{}.json", std::process::id()));
    std::fs::write(&placement, r#"{"owner": [1, 0, 0, 0, 0, 0, 0, 0]}"#).expect("placement file");
    let mut group = expert_parallel(&dir, 2, Some(placement.clone()));
    std::fs::remove_file(&placement).expect("remove placement file");
    let cases = prompts(6, 1024);
    generate(&mut group, &cases);
    let num_experts = 8;
    for (rank, engine) in group.ranks().iter().enumerate() {
        for (i, &count) in engine
            .model()
            .expert_load()
            .expect("expert load")
            .iter()
            .enumerate()
        {
            let expert = i % num_experts;
            if (expert == 0) != (rank == 1) {
                assert_eq!(count, 0, "rank {rank} ran expert {expert}");
            }
        }
    }
}
