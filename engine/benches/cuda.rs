//! The CUDA backend on a synthetic checkpoint shaped like Qwen3-30B-A3B (hidden 2048, 128
//! experts top-8 of width 768, 32 query / 4 KV heads of 128, vocab 151936), with fewer layers
//! so it fits one GPU and the disk. Prints two tables of ratios against limits measured in the
//! same run:
//! - decode step time at 2k context versus the HBM floor: (expert bytes touched + dense bytes
//!   + KV bytes read) / device-to-device copy bandwidth (bytes read and written per second);
//! - prefill tokens/s versus FLOPs / this backend's bf16 GEMM rate on an 8192³ product (its
//!   input already bf16), and the least time the pass can take at both rates (its expert
//!   GEMMs bound by reading their weights where the pass gives each expert few tokens), for
//!   a 2k and an 8k prompt alone and for four 2k prompts in one pass (a loaded prefill
//!   worker's).
//!
//! Times are medians (of `TIMED_STEPS` decode steps, of `PREFILL_SAMPLES` prefills): single
//! steps hit hiccups of a few ms that moved a mean of 8 steps by up to 0.5 ms between runs.
//!
//! `cargo bench -p tandem-engine --bench cuda` (`TANDEM_BENCH_LAYERS`, default 8;
//! `TANDEM_BENCH_DIR` for the checkpoint, default under the temp dir; `TANDEM_BENCH_BATCHES`,
//! comma-separated, the decode batches, default 1,8,32,64,128: empty or `,` (which ncu
//! passes on where it drops an empty value) runs prefill only, so a profiler's first MoE
//! kernels are the 2k prompt's, and one batch puts that batch's steps
//! first). Prints why it skips where no GPU is found.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use tandem_engine::cuda::{CudaBackend, TimelineLaunch, timeline_by_kernel};
use tandem_engine::{
    Engine, EngineConfig, KvRows, Logprobs, Model, SamplingParams, SeqId, StopCriteria,
    write_random_checkpoint,
};

const HIDDEN: usize = 2048;
const EXPERTS: usize = 128;
const TOP_K: usize = 8;
const EXPERT_WIDTH: usize = 768;
const HEADS: usize = 32;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 128;
const VOCAB: usize = 151_936;
const CONTEXT: usize = 2048;
const BATCHES: [usize; 5] = [1, 8, 32, 64, 128];
const PREFILL_LENGTHS: [usize; 2] = [2048, 8192];
/// The prefill table's passes as (prompts, tokens each): one prompt alone, and a loaded
/// prefill worker's pass of several 2k prompts, which share each expert's weight reads.
const PREFILL_PASSES: [(usize, usize); 3] = [(1, 2048), (1, 8192), (4, 2048)];
const BLOCK_SIZE: usize = 16;
const TIMED_STEPS: usize = 32;
const PREFILL_SAMPLES: usize = 3;
/// Matrix-vector products timed for each median.
const GEMV_SAMPLES: usize = 50;
const BF16: usize = 2;
/// One expert's gate, up and down weights.
const EXPERT_PARAMS: usize = 3 * HIDDEN * EXPERT_WIDTH;
const EXPERT_BYTES: usize = EXPERT_PARAMS * BF16;

fn main() {
    if let Err(reason) = tandem_engine::cuda::probe() {
        println!("skipping the cuda bench: no CUDA here ({reason})");
        return;
    }
    let layers: usize = std::env::var("TANDEM_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = std::env::var_os("TANDEM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tandem-qwen3-30b-a3b-{layers}l")));
    if !dir.join("model.safetensors").exists() {
        let started = Instant::now();
        write_random_checkpoint(&dir, &config(layers), 7).expect("checkpoint");
        println!(
            "wrote {} in {:.0} s",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let backend = CudaBackend::new(0).expect("cuda backend");
    let copy = backend.copy_bandwidth(1 << 30, 20).expect("copy bandwidth");
    let gemm = backend.gemm_rate(8192, 10).expect("gemm rate");
    println!(
        "{}: device-to-device copy {:.0} GB/s (read + write); bf16 GEMM 8192^3 {:.0} TFLOP/s",
        backend.device_name(),
        copy / 1e9,
        gemm / 1e12
    );
    // The projections of an 8k prefill, each against the square GEMM's rate.
    let tokens = PREFILL_LENGTHS[1];
    println!("\nprojection GEMMs at {tokens} tokens (conversion to bf16 included)");
    println!("| projection | k | n | TFLOP/s | of GEMM rate |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, k, n) in [
        ("q", HIDDEN, HEADS * HEAD_DIM),
        ("k, v", HIDDEN, KV_HEADS * HEAD_DIM),
        ("o", HEADS * HEAD_DIM, HIDDEN),
        ("router", HIDDEN, EXPERTS),
    ] {
        let rate = backend
            .gemm_shape_rate(tokens, k, n, 10)
            .expect("gemm rate");
        println!(
            "| {name} | {k} | {n} | {:.0} | {:.0}% |",
            rate / 1e12,
            100.0 * rate / gemm
        );
    }
    // A decode step of one sequence reads each projection once, from HBM; read again at
    // once it comes from L2 (50 MB on an H100): what prefetching weights ahead could give.
    // Each time includes the launch between its two events (6.5 µs for an empty kernel on
    // an H100, experiments/gemv-probe.cu): compare the columns, not with the copy rate.
    println!("\nmatrix-vector products of one row (median of {GEMV_SAMPLES}, each timed alone)");
    println!("| projection | MB | from HBM µs | GB/s | again µs | GB/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, k, n) in [
        ("q, k, v", HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
        ("o", HEADS * HEAD_DIM, HIDDEN),
    ] {
        let (cold, warm) = backend
            .gemv_seconds(k, n, 256 << 20, GEMV_SAMPLES)
            .expect("gemv");
        let (cold, warm) = (median(cold), median(warm));
        let bytes = (k * n * BF16) as f64;
        println!(
            "| {name} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} |",
            bytes / 1e6,
            cold * 1e6,
            bytes / cold / 1e9,
            warm * 1e6,
            bytes / warm / 1e9
        );
    }
    println!();
    let backend_name = backend.device_name().to_owned();
    let checkpoint_config = config(layers);
    let started = Instant::now();
    let model = Model::load(&dir, backend, &mut |_| {}).expect("model loads");
    println!(
        "qwen3-30b-a3b shape, {layers} layers, loaded in {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    let batches = decode_batches();
    let largest = batches.iter().copied().max().unwrap_or(0);
    let blocks_needed = largest * (CONTEXT + 64) / BLOCK_SIZE + 64;
    let config = EngineConfig {
        block_size: BLOCK_SIZE,
        num_blocks: blocks_needed.max(PREFILL_LENGTHS[1] / BLOCK_SIZE + 64),
        max_batch_tokens: PREFILL_LENGTHS[1],
        max_running: largest.max(256),
        // Every step computes: repeated prompts must not hit a prefix cache.
        prefix_caching: false,
    };
    let mut engine = Engine::new(model, None, config).expect("engine");

    // What `tandemctl calibrate` fits a hardware profile to (TANDEM_BENCH_JSON=path).
    let mut measured = json!({
        "device": backend_name,
        "layers": layers,
        "config": checkpoint_config,
        "context": CONTEXT,
        "copy_bytes_per_s": copy,
        "gemm_flops": gemm,
        "decode": [],
        "prefill": [],
    });
    println!("decode at {CONTEXT} context");
    // The host's wait for the step's tokens: near zero, the host set the pace (launching
    // the step's kernels took as long as running them); near the step, the GPU did. The
    // device's idle time: from the last step's tokens to this step's first kernel, what
    // overlapping steps could hide.
    println!(
        "| batch | step ms (median) | floor ms | of floor | tokens/s | host waits ms | device idle ms |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut timelines = Vec::new();
    for &batch in &batches {
        let DecodeSteps {
            step,
            host_wait: wait,
            idle,
            timeline,
        } = decode_step_seconds(&mut engine, batch, layers);
        timelines.extend(timeline.map(|launches| (batch, step, launches)));
        measured["decode"]
            .as_array_mut()
            .expect("array")
            .push(json!({"batch": batch, "seconds": step}));
        // The copy's rate counts bytes read and written: the memory system's traffic rate,
        // which a step that only reads can reach too.
        let floor = decode_floor_bytes(batch, layers) / copy;
        println!(
            "| {batch} | {:.2} | {:.2} | {:.0}% | {:.0} | {:.2} | {:.3} |",
            step * 1e3,
            floor * 1e3,
            100.0 * floor / step,
            batch as f64 / step,
            wait * 1e3,
            idle * 1e3
        );
    }

    for (batch, step, launches) in &timelines {
        print_timeline(*batch, *step, launches);
    }

    // A prompt and its first token; then the same prompt with its KV exported to the host
    // layer by layer, as a prefill worker does for a decode worker it shares no GPU with.
    // Bound: the least time the prompt can take here (prefill_bound_seconds), and the share
    // of the GEMM rate that time would read as. Host waits and device idle as in the decode
    // table, over the pass: the GPU idle while the host prepares the pass or between copies
    // back, and how long the host waited for the token (the pass less its launch time).
    println!("\nprefill");
    println!(
        "| prompt | ms (median) | tokens/s | TFLOP/s | of GEMM rate | bound ms | bound's share of GEMM rate | with host export ms | host waits ms | device idle ms |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (prompts, len) in PREFILL_PASSES {
        let mut sample = |export| {
            let samples: Vec<[f64; 3]> = (0..PREFILL_SAMPLES)
                .map(|_| {
                    warm_up(&mut engine);
                    prefill_seconds(&mut engine, prompts, len, export)
                })
                .collect();
            [0, 1, 2].map(|i| median(samples.iter().map(|s| s[i]).collect()))
        };
        let [seconds, waits, idle] = sample(false);
        let [exporting, ..] = sample(true);
        measured["prefill"]
            .as_array_mut()
            .expect("array")
            .push(json!({
                "tokens": prompts * len,
                "prompt_tokens": len,
                "seconds": seconds,
                "exporting_seconds": exporting
            }));
        let flops = prefill_flops(prompts, len, layers);
        let bound = prefill_bound_seconds(prompts, len, layers, copy, gemm);
        let pass = match prompts {
            1 => len.to_string(),
            _ => format!("{prompts} × {len}"),
        };
        println!(
            "| {pass} | {:.2} | {:.0} | {:.1} | {:.0}% | {:.2} | {:.0}% | {:.2} | {:.2} | {:.3} |",
            seconds * 1e3,
            (prompts * len) as f64 / seconds,
            flops / seconds / 1e12,
            100.0 * flops / seconds / gemm,
            bound * 1e3,
            100.0 * flops / bound / gemm,
            exporting * 1e3,
            waits * 1e3,
            idle * 1e3
        );
    }

    if let Some(path) = std::env::var_os("TANDEM_BENCH_JSON") {
        std::fs::write(&path, format!("{measured:#}")).expect("write bench json");
    }

    // Where the time goes: every operation timed between synchronizations (slower overall).
    for &batch in batches.iter().filter(|b| [1, 8, 64].contains(b)) {
        engine.model().backend().start_profile();
        decode_step_seconds(&mut engine, batch, layers);
        println!(
            "\nprofile: decode batch {batch}, {} steps\n{}",
            TIMED_STEPS + 1,
            engine.model().backend().take_profile()
        );
    }
    for len in PREFILL_LENGTHS {
        warm_up(&mut engine);
        engine.model().backend().start_profile();
        prefill_seconds(&mut engine, 1, len, true);
        println!(
            "\nprofile: prefill {len}\n{}",
            engine.model().backend().take_profile()
        );
    }
}

/// The decode batches to time: `TANDEM_BENCH_BATCHES` (comma-separated, empty for none), else
/// BATCHES.
fn decode_batches() -> Vec<usize> {
    let Ok(list) = std::env::var("TANDEM_BENCH_BATCHES") else {
        return BATCHES.to_vec();
    };
    list.split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| match b.parse() {
            Ok(batch) if batch > 0 => batch,
            _ => panic!("TANDEM_BENCH_BATCHES: {b:?} is not a batch size"),
        })
        .collect()
}

fn config(layers: usize) -> serde_json::Value {
    json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 6144,
        "moe_intermediate_size": EXPERT_WIDTH,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "norm_topk_prob": true,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "max_position_embeddings": 40960,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "dtype": "bfloat16",
        "eos_token_id": 2
    })
}

/// What `decode_step_seconds` measures.
struct DecodeSteps {
    /// Medians over the timed steps: a step, the host's wait in it for the device, and the
    /// device's idle time before its first kernel.
    step: f64,
    host_wait: f64,
    idle: f64,
    /// The timed steps' launches on the stream's timeline (`TANDEM_CUDA_TIMELINE=1`).
    timeline: Option<Vec<TimelineLaunch>>,
}

/// Decode steps of `batch` sequences holding CONTEXT tokens each, their prompt KV imported
/// (its values do not change the work), timed.
fn decode_step_seconds(
    engine: &mut Engine<CudaBackend>,
    batch: usize,
    layers: usize,
) -> DecodeSteps {
    let width = KV_HEADS * HEAD_DIM;
    let rows = KvRows {
        k: vec![0.01; CONTEXT * width],
        v: vec![0.01; CONTEXT * width],
    };
    let ids: Vec<SeqId> = (0..batch as u64).map(|i| SeqId(1_000_000 + i)).collect();
    for (index, &id) in ids.iter().enumerate() {
        let prompt: Vec<u32> = (0..CONTEXT as u32).map(|t| 3 + t % 1000).collect();
        let stop = StopCriteria {
            ignore_eos: true,
            ..StopCriteria::max_new_tokens(TIMED_STEPS + 4)
        };
        engine
            .reserve(id, prompt, SamplingParams::greedy(), stop)
            .expect("reserve");
        for layer in 0..layers {
            engine.import_kv(id, layer, &rows).expect("import");
        }
        let logprobs = Logprobs {
            chosen: 0.0,
            top: Vec::new(),
        };
        // A first token of its own: sequences alike in every input route alike, and a batch
        // of them touched one token's 8 experts where the floor counts the distinct experts
        // of independently routed tokens (batch 32 read "184% of the floor").
        let first_token = 5 + (index as u32 * 7919) % (VOCAB as u32 - 5);
        engine
            .admit_prefilled(id, first_token, logprobs)
            .expect("admit");
    }
    // Warm up, then time.
    engine.step().expect("step");
    engine.model().backend().take_idle();
    engine.model().backend().take_timeline().expect("timeline");
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..TIMED_STEPS {
        engine.model().backend().take_host_wait();
        let started = Instant::now();
        engine.step().expect("step");
        samples[0].push(started.elapsed().as_secs_f64());
        let backend = engine.model().backend();
        samples[1].push(backend.take_host_wait());
        samples[2].push(backend.take_idle());
    }
    let timeline = engine.model().backend().take_timeline().expect("timeline");
    for id in ids {
        engine.abort(id);
    }
    let [step, host_wait, idle] = samples.map(median);
    DecodeSteps {
        step,
        host_wait,
        idle,
        timeline,
    }
}

/// The timed steps' launches summed by kernel: each kernel's span on the critical path (from
/// the previous kernel's end to its own) and how early its first block was in place.
fn print_timeline(batch: usize, step: f64, launches: &[TimelineLaunch]) {
    println!(
        "\ntimeline: decode batch {batch}, {TIMED_STEPS} steps (each launch from the previous kernel's end to its own; a step's last also holds the host's turn)"
    );
    println!("| kernel | launches a step | µs a step | µs a launch | head start µs a launch |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let steps = TIMED_STEPS as f64;
    let mut total_ns = 0;
    for kernel in timeline_by_kernel(launches) {
        total_ns += kernel.span_ns;
        let launches = kernel.launches as f64;
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.2} |",
            kernel.kernel,
            launches / steps,
            kernel.span_ns as f64 / 1e3 / steps,
            kernel.span_ns as f64 / 1e3 / launches,
            kernel.head_start_ns as f64 / 1e3 / launches
        );
    }
    println!(
        "| all | {:.0} | {:.1} (step median {:.1}) | | |",
        launches.len() as f64 / steps,
        total_ns as f64 / 1e3 / steps,
        step * 1e6
    );
    // Every step launches the same kernels in the same order: each place in it, averaged.
    let per_step = launches.len() / TIMED_STEPS;
    let same_order = launches.len().is_multiple_of(TIMED_STEPS)
        && launches.chunks(per_step).all(|one| {
            one.iter()
                .zip(&launches[..per_step])
                .all(|(a, b)| a.kernel == b.kernel)
        });
    if !same_order {
        println!("(the steps launched different kernels: no table by place in the step)");
        return;
    }
    println!("\n| place in the step | kernel | µs | head start µs |");
    println!("| ---: | --- | ---: | ---: |");
    for place in 0..per_step {
        let at_place = launches.iter().skip(place).step_by(per_step);
        let (span, head): (u64, u64) = at_place
            .map(|l| (l.span_ns.unwrap_or(0), l.head_start_ns))
            .fold((0, 0), |(s, h), (ls, lh)| (s + ls, h + lh));
        println!(
            "| {place} | {} | {:.2} | {:.2} |",
            launches[place].kernel,
            span as f64 / 1e3 / steps,
            head as f64 / 1e3 / steps
        );
    }
}

/// Bytes one decode step must read at least: the experts its tokens touch (expected distinct
/// experts under uniform routing), the dense weights, the LM head and the KV of the context.
fn decode_floor_bytes(batch: usize, layers: usize) -> f64 {
    let touched = touched_experts(batch);
    let attention = (HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN) * BF16;
    let router = HIDDEN * EXPERTS * BF16;
    let kv = batch * CONTEXT * 2 * KV_HEADS * HEAD_DIM * BF16;
    let per_layer = touched * EXPERT_BYTES as f64 + (attention + router + kv) as f64;
    per_layer * layers as f64 + (VOCAB * HIDDEN * BF16) as f64
}

/// Experts `tokens` independently routed tokens touch in a layer, expected under uniform
/// routing.
fn touched_experts(tokens: usize) -> f64 {
    let miss = 1.0 - TOP_K as f64 / EXPERTS as f64;
    EXPERTS as f64 * (1.0 - miss.powf(tokens as f64))
}

/// The middle value (the upper one of an even count).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A short pass before a timed one, so the timed one starts on a warm engine.
fn warm_up(engine: &mut Engine<CudaBackend>) {
    let prompt: Vec<u32> = (3..19).collect();
    engine.score(&prompt).expect("warm-up");
}

/// Seconds to prefill `prompts` prompts of `len` tokens in one pass and pick their first
/// tokens, exporting their KV to the host or not; and of those, the seconds the host waited
/// for copies back and the device sat idle (`CudaBackend::take_host_wait`, `take_idle`).
/// The caller warms up first (`warm_up`), outside a profile.
fn prefill_seconds(
    engine: &mut Engine<CudaBackend>,
    prompts: usize,
    len: usize,
    export: bool,
) -> [f64; 3] {
    // Prompts of their own, so their tokens route apart as different requests' do.
    let texts: Vec<Vec<u32>> = (0..prompts as u32)
        .map(|index| {
            (0..len as u32)
                .map(|t| 3 + (t * 7 + index * 131) % 5000)
                .collect()
        })
        .collect();
    let backend = engine.model().backend();
    backend.take_host_wait();
    backend.take_idle();
    let started = Instant::now();
    for (index, prompt) in texts.into_iter().enumerate() {
        let (id, params) = (SeqId(9_000_000 + index as u64), SamplingParams::greedy());
        if export {
            engine.add_prefill_request(id, prompt, params)
        } else {
            engine.add_request(id, prompt, params, StopCriteria::max_new_tokens(1))
        }
        .expect("prefill");
    }
    while engine.has_work() {
        engine.step().expect("step");
    }
    let seconds = started.elapsed().as_secs_f64();
    let backend = engine.model().backend();
    [seconds, backend.take_host_wait(), backend.take_idle()]
}

/// Matrix FLOPs of a prefill of `prompts` prompts of `len` tokens: 2 per active parameter
/// per token, plus each prompt's causal attention and its first token's LM head.
fn prefill_flops(prompts: usize, len: usize, layers: usize) -> f64 {
    let attention_params = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN;
    let expert_params = TOP_K * EXPERT_PARAMS + HIDDEN * EXPERTS;
    let dense = 2.0 * len as f64 * ((attention_params + expert_params) * layers) as f64;
    // QKᵀ and PV over the causal half: 2 · 2 · len² / 2 · heads · head_dim per layer.
    let attention = 2.0 * (len * len) as f64 * (HEADS * HEAD_DIM * layers) as f64;
    prompts as f64 * (dense + attention + 2.0 * (VOCAB * HIDDEN) as f64)
}

/// The least time a prefill of `prompts` prompts of `len` tokens can take at these rates:
/// each layer's expert GEMMs take the longer of their FLOPs at the GEMM rate and reading the
/// weights of every expert the pass touches at the copy rate (a 2k prompt alone gives each
/// expert ~128 tokens, under the ~260 FLOPs a weight byte an H100 needs to be
/// compute-bound), and every other FLOP runs at the GEMM rate.
fn prefill_bound_seconds(prompts: usize, len: usize, layers: usize, copy: f64, gemm: f64) -> f64 {
    let tokens = prompts * len;
    let expert_flops = 2.0 * (tokens * TOP_K * EXPERT_PARAMS) as f64;
    let expert_reads = touched_experts(tokens) * EXPERT_BYTES as f64;
    let experts = (expert_flops / gemm).max(expert_reads / copy) * layers as f64;
    experts + (prefill_flops(prompts, len, layers) - expert_flops * layers as f64) / gemm
}
