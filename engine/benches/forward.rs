//! Engine throughput on the CPU backend, printed as a table of ratios against limits measured
//! in the same run: the `gemm` crate's own rate on a square product (compute bound) and a
//! plain memory read (bandwidth bound); and a model load against the same read.
//!
//! `cargo bench -p tandem-engine --bench forward` (add `-- --quick` for a smaller model).

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem_engine::{
    Backend, CpuBackend, Engine, EngineConfig, ExpertWeights, HostTensor, Model, Routing,
    SamplingParams, SeqId, StopCriteria, write_random_checkpoint,
};

const SQUARE_GEMM_DIM: usize = 1024;
const PROMPT_TOKENS: usize = 64;
const DECODE_STEPS: usize = 8;
const BATCHES: [usize; 3] = [1, 8, 32];
const MIN_MEASURE: Duration = Duration::from_millis(500);

struct Shape {
    hidden: usize,
    layers: usize,
    experts: usize,
    top_k: usize,
    expert_width: usize,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let shape = if quick {
        Shape {
            hidden: 512,
            layers: 2,
            experts: 16,
            top_k: 2,
            expert_width: 256,
        }
    } else {
        Shape {
            hidden: 1024,
            layers: 8,
            experts: 16,
            top_k: 2,
            expert_width: 512,
        }
    };
    let threads = rayon::current_num_threads();
    println!(
        "synthetic qwen3_moe: hidden {}, {} layers, {} experts top-{}, expert width {}; {threads} threads",
        shape.hidden, shape.layers, shape.experts, shape.top_k, shape.expert_width
    );
    let gemm_rate = square_gemm_rate();
    let bandwidth = read_bandwidth();
    println!(
        "gemm square {SQUARE_GEMM_DIM}^3: {:.1} GFLOP/s; memory copy: {:.1} GB/s\n",
        gemm_rate / 1e9,
        bandwidth / 1e9
    );

    println!(
        "| expert GEMMs (moe_experts) | tokens | GFLOP/s | of gemm square | weight GB/s | of copy bandwidth |"
    );
    println!("|---|---|---|---|---|---|");
    for tokens in [32, 512] {
        let (flops, bytes, secs) = expert_gemms(&shape, tokens);
        println!(
            "| batch {tokens} | {tokens} | {:.1} | {:.0}% | {:.1} | {:.0}% |",
            flops / secs / 1e9,
            100.0 * flops / secs / gemm_rate,
            bytes / secs / 1e9,
            100.0 * bytes / secs / bandwidth
        );
    }

    let dir = std::env::temp_dir().join(format!("tandem-bench-{}", std::process::id()));
    write_random_checkpoint(&dir, &config_json(&shape), 1).expect("synthetic checkpoint");
    let (bytes, secs) = load_seconds(&dir);
    println!("\n| model load (page cache warm) | checkpoint GB | s | GB/s | of copy bandwidth |");
    println!("|---|---|---|---|---|");
    println!(
        "| Model::load, CPU backend | {:.2} | {secs:.2} | {:.2} | {:.0}% |",
        bytes / 1e9,
        bytes / secs / 1e9,
        100.0 * bytes / secs / bandwidth
    );
    println!("\n| batch | prefill tok/s | decode tok/s | decode step ms |");
    println!("|---|---|---|---|");
    for batch in BATCHES {
        let (prefill, decode, step) = serve(&dir, batch);
        println!(
            "| {batch} | {prefill:.0} | {decode:.1} | {:.1} |",
            step * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn config_json(s: &Shape) -> serde_json::Value {
    json!({
        "model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": s.hidden,
        "intermediate_size": 4 * s.hidden, "moe_intermediate_size": s.expert_width,
        "num_hidden_layers": s.layers, "num_attention_heads": s.hidden / 64, "num_key_value_heads": s.hidden / 256,
        "head_dim": 64, "num_experts": s.experts, "num_experts_per_tok": s.top_k, "norm_topk_prob": true,
        "max_position_embeddings": 4096, "dtype": "bfloat16"
    })
}

/// The checkpoint's bytes and the fastest of three loads of it (the first also warms the
/// page cache): reading, widening to f32 and each backend's layout.
fn load_seconds(dir: &std::path::Path) -> (f64, f64) {
    let bytes = std::fs::metadata(dir.join("model.safetensors"))
        .expect("checkpoint file")
        .len() as f64;
    let secs = (0..3)
        .map(|_| {
            let start = Instant::now();
            black_box(Model::load(dir, CpuBackend, &mut |_| {}).expect("model loads"));
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (bytes, secs)
}

/// Repeats `f` until `MIN_MEASURE` has passed; returns seconds per call.
fn time_per_call(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut calls = 0;
    while start.elapsed() < MIN_MEASURE {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / calls as f64
}

fn square_gemm_rate() -> f64 {
    let n = SQUARE_GEMM_DIM;
    let backend = CpuBackend;
    let w = backend
        .matrix(HostTensor {
            shape: vec![n, n],
            data: vec![0.5; n * n],
        })
        .expect("matrix");
    let x = tandem_engine::CpuTensor {
        rows: n,
        cols: n,
        data: vec![0.25; n * n],
    };
    let secs = time_per_call(|| {
        black_box(backend.linear(&x, &w, None).expect("linear"));
    });
    2.0 * (n * n * n) as f64 / secs
}

/// Bytes moved per second by a plain copy (read plus write), the bound for streaming weights.
fn read_bandwidth() -> f64 {
    let src = vec![1.0f32; 64 << 20];
    let mut dst = vec![0.0f32; src.len()];
    let secs = time_per_call(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    });
    (2 * src.len() * 4) as f64 / secs
}

/// FLOPs, weight bytes touched and seconds of one `moe_experts` call over `tokens` rows.
fn expert_gemms(s: &Shape, tokens: usize) -> (f64, f64, f64) {
    let backend = CpuBackend;
    let (h, i) = (s.hidden, s.expert_width);
    let experts: Vec<ExpertWeights<CpuBackend>> = (0..s.experts)
        .map(|e| ExpertWeights {
            gate_up: backend
                .matrix(HostTensor {
                    shape: vec![2 * i, h],
                    data: vec![0.01 * e as f32; 2 * i * h],
                })
                .expect("gate_up"),
            down: backend
                .matrix(HostTensor {
                    shape: vec![h, i],
                    data: vec![0.01; h * i],
                })
                .expect("down"),
        })
        .collect();
    // Round-robin routing: every expert gets the same share, as a balanced router would give.
    let expert_ids: Vec<usize> = (0..tokens * s.top_k).map(|j| j % s.experts).collect();
    let routing = Routing {
        experts_per_token: s.top_k,
        weights: vec![0.5; expert_ids.len()],
        expert_ids,
    };
    let x = tandem_engine::CpuTensor {
        rows: tokens,
        cols: h,
        data: vec![0.1; tokens * h],
    };
    let secs = time_per_call(|| {
        black_box(backend.moe_experts(&x, &routing, &experts).expect("moe"));
    });
    let flops = (tokens * s.top_k) as f64 * 2.0 * 3.0 * (h * i) as f64;
    let active = s.experts.min(tokens * s.top_k);
    let bytes = active as f64 * 3.0 * (h * i) as f64 * 4.0;
    (flops, bytes, secs)
}

/// Prefill tokens/s, decode tokens/s and seconds per decode step with `batch` sequences.
fn serve(dir: &std::path::Path, batch: usize) -> (f64, f64, f64) {
    let model = Model::load(dir, CpuBackend, &mut |_| {}).expect("load");
    let config = EngineConfig {
        max_batch_tokens: batch * PROMPT_TOKENS,
        num_blocks: batch * (PROMPT_TOKENS + DECODE_STEPS + 2).div_ceil(16),
        // Every step computes: repeated prompts must not hit a prefix cache.
        prefix_caching: false,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, None, config).expect("engine");
    for b in 0..batch {
        let prompt: Vec<u32> = (0..PROMPT_TOKENS)
            .map(|t| ((b * 131 + t * 17) % 4000) as u32 + 3)
            .collect();
        let stop = StopCriteria {
            ignore_eos: true,
            ..StopCriteria::max_new_tokens(DECODE_STEPS + 1)
        };
        engine
            .add_request(SeqId(b as u64), prompt, SamplingParams::greedy(), stop)
            .expect("add");
    }
    let start = Instant::now();
    let first = engine.step().expect("prefill step");
    let prefill_secs = start.elapsed().as_secs_f64();
    assert_eq!(
        first.prefill_tokens,
        batch * PROMPT_TOKENS,
        "one step prefills every prompt"
    );
    let start = Instant::now();
    let mut decoded = 0;
    while engine.has_work() {
        decoded += engine.step().expect("decode step").decode_tokens;
    }
    let decode_secs = start.elapsed().as_secs_f64();
    (
        (batch * PROMPT_TOKENS) as f64 / prefill_secs,
        decoded as f64 / decode_secs,
        decode_secs / DECODE_STEPS as f64,
    )
}
