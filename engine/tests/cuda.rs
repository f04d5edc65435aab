//! The CUDA backend against the CPU backend, kernel by kernel and on every fixture family. GPU
//! tests print why they skip where no GPU (or no CUDA library) is found; the NVRTC test needs
//! only libnvrtc, and fails instead of skipping when `TANDEM_REQUIRE_NVRTC` is set, and the
//! register test also ptxas (`TANDEM_PTXAS`, required with `TANDEM_REQUIRE_PTXAS`); CI sets
//! both. On a GPU machine, tests/gpu/build and tests/gpu/run build and run them.
//!
//! Tolerance rule. Both backends run the same bf16 weights (f32 fixtures are rounded to a bf16
//! copy first, since the GPU keeps weights in bf16); the GPU also rounds activations to bf16
//! before each GEMM and keeps the KV cache in bf16. Kernels must match the CPU within 2e-2 of
//! their output's largest |value|. Logits are compared row by row by relative L2 error
//! (‖gpu − cpu‖ / ‖cpu‖): the mean over a prompt's rows must be under 1e-2 and every row under
//! 1e-1. A row between 2e-2 and 1e-1 is a routing flip: the rounding moved a token across a
//! near tie of its router, so it ran through another expert (such rows are counted and
//! printed). Greedy tokens must be equal up to the first step whose CPU top-2 margin is under
//! 4e-2 of the largest |logit| (a near tie the GPU may break the other way); after such a step
//! the sequences may differ.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tandem_engine::cuda::{
    CudaBackend, KERNEL_MAX_ARGS, KERNEL_NAMES, NcclCollective, compile_kernels,
};
use tandem_engine::{
    AttentionBatch, AttentionSeq, Backend, BlockId, Collective, CpuBackend, Engine, EngineConfig,
    EngineGroup, ExpertPlacement, ExpertWeights, HeadTransforms, HostTensor, KvSpec, Model,
    Parallelism, ResidualNorm, RopeTable, RouteRule, Routing, SamplingParams, SeqId, Sharding,
    StopCriteria, demo_config, load_ranks, load_tensor_parallel, write_random_checkpoint,
};

const RELATIVE_TOLERANCE: f32 = 2e-2;
/// Logit rows: the mean relative L2 error of a prompt's rows, and any one row's.
const MEAN_LOGIT_TOLERANCE: f32 = 1e-2;
const ROW_LOGIT_TOLERANCE: f32 = 1e-1;
const FAMILIES: [&str; 6] = [
    "qwen3-moe-f32",
    "qwen3-moe-tied-bf16",
    "mixtral-bf16",
    "mixtral-f32-sharded",
    "qwen2-moe-f32",
    "qwen2-moe-bf16",
];

/// A fixture checkpoint; `TANDEM_FIXTURES` points elsewhere when the binary runs on another
/// machine (tests/gpu/run).
fn fixture(name: &str) -> PathBuf {
    std::env::var_os("TANDEM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"))
        .join(name)
}

/// `Some` where CUDA runs; otherwise prints why the test skips (or fails, with
/// `TANDEM_REQUIRE_CUDA` set, as tests/gpu/run sets it).
fn cuda_or_skip(test: &str) -> Option<()> {
    match tandem_engine::cuda::probe() {
        Ok(()) => Some(()),
        Err(reason) if std::env::var_os("TANDEM_REQUIRE_CUDA").is_some() => {
            panic!("{test}: CUDA required but unavailable: {reason}")
        }
        Err(reason) => {
            eprintln!("skipping {test}: no CUDA here ({reason})");
            None
        }
    }
}

fn engine<B: Backend>(dir: &Path, backend: B) -> Engine<B> {
    let model = Model::load(dir, backend, &mut |_| {}).expect("fixture loads");
    let config = EngineConfig {
        num_blocks: 256,
        ..EngineConfig::default()
    };
    Engine::new(model, None, config).expect("engine")
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (i * 17 + salt * 31) % 400)
        .collect()
}

/// A copy of fixture `dir` with every f32 weight rounded to bf16, as the GPU holds them.
fn bf16_copy(dir: &Path) -> PathBuf {
    let copy = std::env::temp_dir().join(format!(
        "tandem-bf16-{}-{}",
        dir.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("fixture"),
        std::process::id()
    ));
    std::fs::create_dir_all(&copy).expect("temp dir");
    for entry in std::fs::read_dir(dir).expect("fixture") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_owned();
        let is_weights =
            path.extension().is_some_and(|e| e == "safetensors") && name != "reference.safetensors";
        if !is_weights {
            std::fs::copy(&path, copy.join(&name)).expect("copy");
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let converted: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| match view.dtype() {
                safetensors::Dtype::F32 => {
                    let data = view
                        .data()
                        .chunks_exact(4)
                        .flat_map(|b| {
                            let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                            half::bf16::from_f32(x).to_le_bytes()
                        })
                        .collect();
                    (name, data, view.shape().to_vec(), safetensors::Dtype::BF16)
                }
                dtype => (name, view.data().to_vec(), view.shape().to_vec(), dtype),
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = converted
            .iter()
            .map(|(name, data, shape, dtype)| {
                let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                    .expect("view");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &copy.join(&name)).expect("write");
    }
    copy
}

/// A Qwen3-MoE checkpoint of random bf16 weights at the MoE families' head_dim, 128, which
/// the fixtures' small heads do not reach (the GPU's `_hd128` kernels and Hopper's prefill
/// attention run only there): the demo model's shape with 2 layers of 8 query and 2 KV heads
/// of 128. Written once per process.
fn head_dim_128_checkpoint() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tandem-hd128-{}", std::process::id()));
        let mut config = demo_config();
        for (key, value) in [
            ("head_dim", 128),
            ("num_key_value_heads", 2),
            ("num_hidden_layers", 2),
        ] {
            config[key] = value.into();
        }
        write_random_checkpoint(&dir, &config, 11).expect("head_dim 128 checkpoint");
        dir
    })
    .clone()
}

/// Every checkpoint the model-level GPU tests run: each fixture family as a bf16 copy, and
/// the head_dim 128 one.
fn checkpoints() -> Vec<(&'static str, PathBuf)> {
    FAMILIES
        .iter()
        .map(|&family| (family, bf16_copy(&fixture(family))))
        .chain([("qwen3-moe-head-dim-128", head_dim_128_checkpoint())])
        .collect()
}

#[test]
fn the_head_dim_128_checkpoint_runs_on_the_cpu_backend() {
    // The GPU tests' inputs, checked where CI runs: a config mistake fails here, before a GPU
    // run is spent on it.
    let mut cpu = engine(&head_dim_128_checkpoint(), CpuBackend);
    assert_eq!(cpu.model().config().head_dim, 128);
    let vocab = cpu.model().config().vocab_size;
    let logits = cpu.score(&prompt(40, 1)).expect("score");
    assert_eq!(logits.len(), 40 * vocab);
    assert!(logits.iter().all(|x| x.is_finite()));
    let tokens = batched_greedy(&mut cpu, &[prompt(9, 2)], 4);
    assert_eq!(tokens[0].len(), 4);
}

/// The relative L2 error ‖gpu − cpu‖ / ‖cpu‖ of each row of `cols` values.
fn relative_l2_by_row(cpu: &[f32], gpu: &[f32], cols: usize) -> Vec<f32> {
    cpu.chunks_exact(cols)
        .zip(gpu.chunks_exact(cols))
        .map(|(c, g)| {
            let norm = c.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            let diff = c.iter().zip(g).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
            diff.sqrt() / norm
        })
        .collect()
}

/// The worst |gpu − cpu| over a row, relative to the row's largest |cpu logit|.
fn worst_relative_error(cpu: &[f32], gpu: &[f32], vocab: usize) -> f32 {
    cpu.chunks_exact(vocab)
        .zip(gpu.chunks_exact(vocab))
        .map(|(c, g)| {
            let scale = c.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
            let diff = c
                .iter()
                .zip(g)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            diff / scale
        })
        .fold(0.0, f32::max)
}

/// Compiles the kernels for Hopper with and without its own instructions; with
/// `TANDEM_PTX_DIR` set, writes each PTX there (`sm_90.ptx`, `sm_90a.ptx`), so a change that
/// should not alter the kernels (a refactor of the CUDA C) can be checked without a GPU by
/// comparing the files of two commits.
#[test]
fn every_kernel_compiles_with_nvrtc() {
    // sm_90a adds Hopper's warpgroup instructions to the MoE GEMMs.
    for arch in ["sm_90", "sm_90a"] {
        let Some(ptx) = kernels_ptx("every_kernel_compiles_with_nvrtc", arch, false) else {
            return;
        };
        if let Some(dir) = std::env::var_os("TANDEM_PTX_DIR") {
            let path = PathBuf::from(dir).join(format!("{arch}.ptx"));
            std::fs::write(&path, &ptx)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "kernel {name} missing from the {arch} PTX"
            );
        }
        assert_eq!(
            ptx.contains("wgmma.mma_async"),
            arch == "sm_90a",
            "warpgroup instructions in the {arch} PTX"
        );
        // The host lets each kernel start while the previous one drains: each must wait for
        // it (`wait_for_previous_kernel`) before touching its outputs.
        for entry in ptx.split(".entry ").skip(1) {
            let name = entry.split('(').next().unwrap_or(entry);
            assert!(
                entry.contains("griddepcontrol.wait"),
                "kernel {name} never waits for the previous kernel in the {arch} PTX"
            );
            // A launch holds at most KERNEL_MAX_ARGS arguments (and panics past them).
            let params = entry
                .split(')')
                .next()
                .unwrap_or(entry)
                .matches(".param")
                .count();
            assert!(
                params <= KERNEL_MAX_ARGS,
                "kernel {name} takes {params} parameters, over the {KERNEL_MAX_ARGS} a launch holds"
            );
        }
    }
}

/// The kernels' PTX for `arch`; `None` (printed) where libnvrtc is missing, unless
/// `TANDEM_REQUIRE_NVRTC` is set.
fn kernels_ptx(test: &str, arch: &'static str, timeline: bool) -> Option<String> {
    match compile_kernels(arch, timeline) {
        Ok(ptx) => Some(ptx),
        Err(e) if std::env::var_os("TANDEM_REQUIRE_NVRTC").is_none() => {
            eprintln!("skipping {test}: {e}");
            None
        }
        Err(e) => panic!("kernels did not compile for {arch}: {e}"),
    }
}

/// The timeline's build (`TANDEM_CUDA_TIMELINE=1`): every kernel records its launch at its
/// wait for the previous one, so the host can pair each launch with a record.
#[test]
fn every_kernel_records_its_launch_in_the_timeline_build() {
    let Some(ptx) = kernels_ptx(
        "every_kernel_records_its_launch_in_the_timeline_build",
        "sm_90a",
        true,
    ) else {
        return;
    };
    for entry in ptx.split(".entry ").skip(1) {
        let name = entry.split('(').next().unwrap_or(entry);
        assert!(
            entry.contains("%globaltimer") && entry.contains("%gridid"),
            "kernel {name} records no launch in the timeline build"
        );
    }
    let plain = kernels_ptx(
        "every_kernel_records_its_launch_in_the_timeline_build",
        "sm_90a",
        false,
    )
    .expect("compiled once already");
    assert!(
        !plain.contains("%globaltimer"),
        "the plain build records a timeline"
    );
}

/// Kernels allowed to spill registers to local memory, and why; every other kernel must fit.
const MAY_SPILL: [(&str, &str); 1] = [(
    "attention_prefill_mma_hd128",
    "44 bytes stored and 48 loaded under the 168 registers of three 128-thread blocks an SM; \
     it runs only on GPUs before Hopper (sm_90a takes attention_prefill_wgmma_hd128)",
)];

/// ptxas: `TANDEM_PTXAS`, else on PATH or in /usr/local/cuda/bin. `None` (printed) where
/// there is none, unless `TANDEM_REQUIRE_PTXAS` is set (CI installs it from PyPI's
/// `nvidia-cuda-nvcc` wheel).
fn ptxas_or_skip(test: &str) -> Option<PathBuf> {
    let named = std::env::var_os("TANDEM_PTXAS").map(PathBuf::from);
    let found = match &named {
        Some(path) => Some(path.clone()).filter(|p| p.is_file()),
        None => std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .chain([PathBuf::from("/usr/local/cuda/bin")])
            .map(|dir| dir.join("ptxas"))
            .find(|p| p.is_file()),
    };
    if found.is_none() {
        let reason = match &named {
            Some(path) => format!("TANDEM_PTXAS names {}, which is not a file", path.display()),
            None => "no ptxas on PATH or in /usr/local/cuda/bin (TANDEM_PTXAS names one)".into(),
        };
        assert!(
            std::env::var_os("TANDEM_REQUIRE_PTXAS").is_none(),
            "{test}: {reason}"
        );
        eprintln!("skipping {test}: {reason}");
    }
    found
}

/// What `ptxas -v` says of each kernel: registers and bytes spilled (stores + loads).
fn assembled_kernels(log: &str) -> HashMap<String, (usize, usize)> {
    let number_before = |line: &str, unit: &str| -> usize {
        let head = &line[..line.find(unit).unwrap_or(0)];
        head.split(|c: char| !c.is_ascii_digit())
            .rfind(|word| !word.is_empty())
            .and_then(|word| word.parse().ok())
            .unwrap_or(0)
    };
    let mut kernels = HashMap::new();
    let mut current: Option<String> = None;
    // Spill lines follow "Function properties for F": the kernel's own, or a callee's.
    let mut own_properties = false;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or(rest).to_owned();
            kernels.insert(name.clone(), (0, 0));
            current = Some(name);
        } else if let Some(function) = line.split("Function properties for ").nth(1) {
            own_properties = current.as_deref() == Some(function.trim());
        } else if let Some(entry) = current.as_ref().and_then(|n| kernels.get_mut(n)) {
            if line.contains("bytes spill stores") && own_properties {
                entry.1 = number_before(line, " bytes spill stores")
                    + number_before(line, " bytes spill loads");
            } else if line.contains(" registers") {
                entry.0 = number_before(line, " registers");
            }
        }
    }
    kernels
}

#[test]
fn ptxas_logs_give_each_kernels_registers_and_spills() {
    let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'attention_prefill_mma_hd128' for 'sm_90a'
ptxas info    : Function properties for attention_prefill_mma_hd128
    40 bytes stack frame, 44 bytes spill stores, 48 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 40 bytes cumulative stack size
ptxas info    : Compiling entry function 'rope' for 'sm_90a'
ptxas info    : Function properties for rope
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for helper
    8 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 1024 bytes smem";
    let kernels = assembled_kernels(log);
    assert_eq!(kernels.len(), 2, "{kernels:?}");
    assert_eq!(kernels["attention_prefill_mma_hd128"], (168, 92));
    // A callee's spills are its own lines, not the kernel's.
    assert_eq!(kernels["rope"], (24, 0));
}

/// Every kernel assembles to machine code within its registers (v14's 8-row matrix-vector try
/// spilled under its cap, and batch 8 went from 2.60 to 3.58 ms: found only on the GPU), and ptxas
/// serializes no warpgroup MMA ("Potential Performance Loss: wgmma.mma_async instructions are
/// serialized"). Needs libnvrtc and ptxas, not a GPU; prints each kernel's registers.
#[test]
fn every_kernel_assembles_without_spilling() {
    let test = "every_kernel_assembles_without_spilling";
    let Some(ptxas) = ptxas_or_skip(test) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("tandem-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for arch in ["sm_90", "sm_90a"] {
        let Some(ptx) = kernels_ptx(test, arch, false) else {
            return;
        };
        let source = dir.join(format!("{arch}.ptx"));
        std::fs::write(&source, ptx).expect("write ptx");
        let output = std::process::Command::new(&ptxas)
            .args([&format!("-arch={arch}"), "-v"])
            .arg(&source)
            .arg("-o")
            .arg(dir.join(format!("{arch}.cubin")))
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "ptxas failed for {arch}:\n{log}");
        assert!(
            !log.contains("Performance Loss"),
            "ptxas serializes instructions for {arch}:\n{log}"
        );
        let kernels = assembled_kernels(&log);
        for name in KERNEL_NAMES {
            let (registers, spilled) = kernels
                .get(name)
                .unwrap_or_else(|| panic!("ptxas assembled no {name} for {arch}:\n{log}"));
            eprintln!("{arch} {name}: {registers} registers, {spilled} bytes spilled");
            if *spilled > 0 {
                let Some((_, why)) = MAY_SPILL.iter().find(|(allowed, _)| *allowed == name) else {
                    panic!("{name} spills {spilled} bytes for {arch} ({registers} registers)");
                };
                eprintln!("  allowed: {why}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gpu_logits_match_the_cpu_backend_on_every_family() {
    if cuda_or_skip("gpu_logits_match_the_cpu_backend_on_every_family").is_none() {
        return;
    }
    let mut failed = Vec::new();
    for (family, dir) in checkpoints() {
        let mut cpu = engine(&dir, CpuBackend);
        let mut gpu = engine(&dir, CudaBackend::new(0).expect("cuda backend"));
        let vocab = cpu.model().config().vocab_size;
        for (len, salt) in [(1, 0), (7, 1), (40, 2), (100, 3)] {
            let p = prompt(len, salt);
            let c = cpu.score(&p).expect("cpu");
            let g = gpu.score(&p).expect("gpu");
            assert_eq!(c.len(), g.len());
            let rows = relative_l2_by_row(&c, &g, vocab);
            let mean = rows.iter().sum::<f32>() / rows.len() as f32;
            let worst = rows.iter().copied().fold(0.0, f32::max);
            let flips = rows.iter().filter(|&&e| e > RELATIVE_TOLERANCE).count();
            eprintln!(
                "{family} prompt {len}: relative L2 mean {mean:.2e}, worst {worst:.2e}, {flips} routing-flip rows"
            );
            if mean > MEAN_LOGIT_TOLERANCE || worst > ROW_LOGIT_TOLERANCE {
                failed.push(format!(
                    "{family} prompt {len}: mean {mean:.2e} worst {worst:.2e}"
                ));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// Greedy tokens of `prompts` decoded together (continuous batching).
fn batched_greedy<B: Backend>(
    engine: &mut Engine<B>,
    prompts: &[Vec<u32>],
    n: usize,
) -> Vec<Vec<u32>> {
    for (i, p) in prompts.iter().enumerate() {
        let stop = StopCriteria {
            ignore_eos: true,
            ..StopCriteria::max_new_tokens(n)
        };
        engine
            .add_request(SeqId(i as u64), p.clone(), SamplingParams::greedy(), stop)
            .expect("request");
    }
    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    while engine.has_work() {
        for event in engine.step().expect("step").events {
            tokens.entry(event.seq.0).or_default().push(event.token);
        }
    }
    (0..prompts.len() as u64)
        .map(|i| tokens.remove(&i).unwrap_or_default())
        .collect()
}

/// CPU top-1 minus top-2 logit after `context`, relative to the largest |logit|.
fn relative_margin(cpu: &mut Engine<CpuBackend>, context: &[u32], vocab: usize) -> f32 {
    let logits = cpu.score(context).expect("score");
    let last = &logits[logits.len() - vocab..];
    let mut sorted: Vec<f32> = last.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let scale = last.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    (sorted[0] - sorted[1]) / scale
}

#[test]
fn gpu_greedy_tokens_equal_the_cpu_backend_single_and_batched() {
    if cuda_or_skip("gpu_greedy_tokens_equal_the_cpu_backend_single_and_batched").is_none() {
        return;
    }
    for (family, dir) in checkpoints() {
        let mut cpu = engine(&dir, CpuBackend);
        let mut gpu = engine(&dir, CudaBackend::new(0).expect("cuda backend"));
        let vocab = cpu.model().config().vocab_size;
        let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(5 + 9 * i, i as u32)).collect();
        for batch in [&prompts[..1], &prompts[..]] {
            let want = batched_greedy(&mut cpu, batch, 12);
            let got = batched_greedy(&mut gpu, batch, 12);
            for ((p, w), g) in batch.iter().zip(&want).zip(&got) {
                let Some(at) = w.iter().zip(g).position(|(a, b)| a != b) else {
                    assert_eq!(w.len(), g.len(), "{family}");
                    continue;
                };
                let context: Vec<u32> = p.iter().chain(&w[..at]).copied().collect();
                let margin = relative_margin(&mut cpu, &context, vocab);
                assert!(
                    margin < 2.0 * RELATIVE_TOLERANCE,
                    "{family}: token {at} differs ({} vs {}) with a clear CPU margin {margin:.2e}",
                    w[at],
                    g[at]
                );
                eprintln!(
                    "{family}: near tie at token {at} (margin {margin:.2e}) broken differently"
                );
            }
        }
    }
}

/// Values that bf16 holds exactly, so both backends start from the same numbers.
struct Values(u64);

impl Values {
    fn take(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                let unit = (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                half::bf16::from_f32(unit * scale).to_f32()
            })
            .collect()
    }
}

/// A `[rows, cols]` tensor holding `data`, through `embed` of an exact table.
fn tensor<B: Backend>(b: &B, rows: usize, cols: usize, data: Vec<f32>) -> B::Tensor {
    let table = b
        .matrix(HostTensor {
            shape: vec![rows, cols],
            data,
        })
        .expect("table");
    let ids: Vec<u32> = (0..rows as u32).collect();
    b.embed(&table, &ids).expect("embed")
}

fn matrix<B: Backend>(b: &B, v: &mut Values, out: usize, inp: usize) -> B::Matrix {
    b.matrix(HostTensor {
        shape: vec![out, inp],
        data: v.take(out * inp, 0.3),
    })
    .expect("matrix")
}

/// Top-2 routing of `tokens` over `experts` experts: two distinct experts a token, as top-k
/// gives.
fn top2_of(experts: usize, tokens: usize) -> Routing {
    Routing {
        experts_per_token: 2,
        expert_ids: (0..tokens)
            .flat_map(|i| [i % experts, (i + 1 + i / experts % (experts - 1)) % experts])
            .collect(),
        weights: (0..tokens)
            .flat_map(|i| [0.75 - (i % 40) as f32 * 0.01, 0.25 + (i % 40) as f32 * 0.01])
            .collect(),
    }
}

/// A row of `moe_experts`: `experts` experts of width `inter` over `tokens` tokens of `hidden`
/// values, routed by [`top2_of`].
fn moe_row<B: Backend>(
    b: &B,
    v: &mut Values,
    name: &str,
    experts: usize,
    tokens: usize,
    hidden: usize,
    inter: usize,
) -> (String, Vec<f32>) {
    let weights: Vec<ExpertWeights<B>> = (0..experts)
        .map(|_| ExpertWeights {
            gate_up: matrix(b, v, 2 * inter, hidden),
            down: matrix(b, v, hidden, inter),
        })
        .collect();
    let x = tensor(b, tokens, hidden, v.take(tokens * hidden, 1.0));
    let y = b
        .moe_experts(&x, &top2_of(experts, tokens), &weights)
        .expect("moe");
    (name.into(), b.to_host(&y).expect("host"))
}

/// `moe_routed` and `moe_routed_add_rms_norm` of `num_experts` experts of width 128, top-2,
/// over each of `token_counts` tokens of 256 values, and the experts' counters after them.
fn routed_outputs<B: Backend>(
    b: &B,
    v: &mut Values,
    num_experts: usize,
    token_counts: &[usize],
    out: &mut Vec<(String, Vec<f32>)>,
) {
    let (hidden_r, inter_r) = (256, 128);
    let rule = RouteRule {
        num_experts,
        experts_per_token: 2,
        renormalize: true,
    };
    let router = b
        .matrix(HostTensor {
            shape: vec![num_experts, hidden_r],
            data: (0..num_experts * hidden_r)
                .map(|i| [-0.125, 0.0, 0.125][(i * 7 + i / 5) % 3])
                .collect(),
        })
        .expect("router");
    let routed_experts: Vec<ExpertWeights<B>> = (0..num_experts)
        .map(|_| ExpertWeights {
            gate_up: matrix(b, v, 2 * inter_r, hidden_r),
            down: matrix(b, v, hidden_r, inter_r),
        })
        .collect();
    let counters = b.expert_counters(num_experts).expect("counters");
    let norm_r = b.vector(v.take(hidden_r, 1.0)).expect("norm");
    for &tokens in token_counts {
        let data = (0..tokens * hidden_r)
            .map(|i| ((i * 13 + i / 7) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let xr = tensor(b, tokens, hidden_r, data);
        let y = b
            .moe_routed(&xr, &router, &rule, &routed_experts, &counters)
            .expect("moe_routed");
        out.push((
            format!("moe_routed_{num_experts}x_{tokens}"),
            b.to_host(&y).expect("host"),
        ));
        // The same experts summed into a residual and the norm after it.
        let mut h = tensor(b, tokens, hidden_r, v.take(tokens * hidden_r, 1.0));
        let norm = ResidualNorm {
            h: &mut h,
            weight: &norm_r,
            eps: 1e-6,
        };
        let normed = b
            .moe_routed_add_rms_norm(&xr, &router, &rule, &routed_experts, &counters, norm)
            .expect("moe_routed_add_rms_norm");
        let values = [
            b.to_host(&h).expect("host"),
            b.to_host(&normed).expect("host"),
        ];
        out.push((
            format!("moe_routed_add_rms_norm_{num_experts}x_{tokens}"),
            values.concat(),
        ));
    }
    let load = b.read_expert_counters(&counters).expect("counters");
    let slots: usize = token_counts
        .iter()
        .map(|t| 2 * t * rule.experts_per_token)
        .sum();
    assert_eq!(
        load.iter().sum::<u64>(),
        slots as u64,
        "{} counts every slot",
        b.name()
    );
    out.push((
        format!("expert_counters_{num_experts}x"),
        load.iter().map(|&c| c as f32).collect(),
    ));
}

/// Runs every kernel on `b` with the same seeded inputs; returns each output by name.
fn run_ops<B: Backend>(b: &B, head_dim: usize) -> Vec<(String, Vec<f32>)> {
    let mut v = Values(42);
    let mut out = Vec::new();
    let (rows, hidden) = (18, 64);
    let x = tensor(b, rows, hidden, v.take(rows * hidden, 1.0));
    let w = matrix(b, &mut v, 48, hidden);
    let bias = b.vector(v.take(48, 0.5)).expect("bias");
    let y = b.linear(&x, &w, Some(&bias)).expect("linear");
    out.push(("linear".into(), b.to_host(&y).expect("host")));
    // A decode step's few rows take the matrix-vector kernels on the GPU (seven rows the
    // tensor-core one, whose 16-row tiles leave 203 weight rows a partial tile); q, k and v
    // share one input.
    let few = tensor(b, 3, hidden, v.take(3 * hidden, 1.0));
    let seven = tensor(b, 7, hidden, v.take(7 * hidden, 1.0));
    let wide = matrix(b, &mut v, 200, hidden);
    let odd = matrix(b, &mut v, 203, hidden);
    for (name, input, middle) in [
        ("linear_qkv_few_rows", &few, &wide),
        ("linear_qkv_seven_rows", &seven, &odd),
        ("linear_qkv", &x, &wide),
    ] {
        let outputs = b
            .linear_qkv(input, [(&w, Some(&bias)), (middle, None), (&w, None)])
            .expect("linear_qkv");
        let values = outputs.iter().flat_map(|y| b.to_host(y).expect("host"));
        out.push((name.into(), values.collect()));
    }
    // Few rows over many values. Seven rows on the GPU: the first warps of a tile take a
    // second round of 32-value blocks, the last of them partial; two tiles take 16 warps a
    // tile (fewer tiles than SMs: 2088 values are 66 blocks, 64 a round), 250 tiles take 8
    // (1064 values are 34 blocks, 32 a round). Three rows over 4104 values: four warps share
    // each weight row's three rounds of chunks, the last round one chunk, one warp idle. One
    // row over 2056 values: eight parts a weight row, the fifth one chunk, three empty.
    for (name, x_rows, weight_rows, long_k) in [
        ("linear_seven_rows_long_k", 7, 20, 2088),
        ("linear_seven_rows_many_tiles", 7, 4000, 1064),
        ("linear_few_rows_long_k", 3, 20, 4104),
        ("linear_one_row_in_parts", 1, 20, 2056),
    ] {
        let x_long = tensor(b, x_rows, long_k, v.take(x_rows * long_k, 1.0));
        let w_long = matrix(b, &mut v, weight_rows, long_k);
        let y = b.linear(&x_long, &w_long, None).expect("linear");
        out.push((name.into(), b.to_host(&y).expect("host")));
    }
    let norm = b.vector(v.take(hidden, 1.0)).expect("norm");
    let head_norm = b.vector(v.take(16, 1.0)).expect("norm");
    out.push((
        "rms_norm".into(),
        b.to_host(&b.rms_norm(&x, &norm, 1e-6).expect("norm"))
            .expect("host"),
    ));
    out.push((
        "rms_norm_heads".into(),
        b.to_host(&b.rms_norm(&x, &head_norm, 1e-6).expect("norm"))
            .expect("host"),
    ));
    // Small positions and long-context ones (large angles).
    let positions: Vec<u32> = (0..rows as u32).map(|i| i * 7919 % 32768).collect();
    let mut r = tensor(b, rows, hidden, v.take(rows * hidden, 1.0));
    b.rope(&mut r, &RopeTable::new(&positions, 16, 10_000.0))
        .expect("rope");
    out.push(("rope".into(), b.to_host(&r).expect("host")));
    // More heads than one block of the GPU kernel rotates (20 heads of 8).
    let mut r = tensor(b, rows, 160, v.take(rows * 160, 1.0));
    b.rope(&mut r, &RopeTable::new(&positions, 8, 10_000.0))
        .expect("rope");
    out.push(("rope_many_heads".into(), b.to_host(&r).expect("host")));
    // A layer's attention inputs in one call (one kernel on the GPU where head_dim is a
    // multiple of 64), with per-head norms and without; K and V read back from the cache.
    let (in_heads, in_kv_heads) = (4, 2);
    let in_spec = KvSpec {
        num_blocks: 4,
        block_size: 4,
        num_kv_heads: in_kv_heads,
        head_dim,
    };
    let q_norm = b.vector(v.take(head_dim, 1.0)).expect("norm");
    let k_norm = b.vector(v.take(head_dim, 1.0)).expect("norm");
    let in_rope = RopeTable::new(&[5, 900, 31_000], head_dim, 1_000_000.0);
    let in_slots = [3, 14, 9];
    for (name, norms) in [
        ("attention_inputs_normed", Some((&q_norm, &k_norm))),
        ("attention_inputs", None),
    ] {
        let mut in_store = b.kv_store(&in_spec).expect("store");
        let qkv = [in_heads, in_kv_heads, in_kv_heads]
            .map(|h| tensor(b, 3, h * head_dim, v.take(3 * h * head_dim, 1.0)));
        let heads = HeadTransforms {
            norms,
            eps: 1e-6,
            rope: &in_rope,
        };
        let q = b
            .attention_inputs(qkv, &heads, &mut in_store, &in_slots)
            .expect("attention_inputs");
        let kv = b.read_kv(&in_store, &in_slots).expect("read_kv");
        out.push((
            name.into(),
            [b.to_host(&q).expect("host"), kv.k, kv.v].concat(),
        ));
    }
    // The residual add and the norm after it, for a decode step's row and for many.
    for (name, n) in [("add_rms_norm_one_row", 1), ("add_rms_norm", rows)] {
        let mut h = tensor(b, n, hidden, v.take(n * hidden, 1.0));
        let delta = tensor(b, n, hidden, v.take(n * hidden, 1.0));
        let normed = b
            .add_rms_norm(&mut h, &delta, &norm, 1e-6)
            .expect("add_rms_norm");
        let values = [
            b.to_host(&h).expect("host"),
            b.to_host(&normed).expect("host"),
        ];
        out.push((name.into(), values.concat()));
    }
    let gate_up = tensor(b, rows, 48, v.take(rows * 48, 2.0));
    out.push((
        "swiglu".into(),
        b.to_host(&b.swiglu(&gate_up).expect("swiglu"))
            .expect("host"),
    ));
    let mut acc = tensor(b, rows, hidden, v.take(rows * hidden, 1.0));
    b.add_assign(&mut acc, &x).expect("add");
    b.scale_rows(&mut acc, &v.take(rows, 2.0)).expect("scale");
    out.push(("add_scale".into(), b.to_host(&acc).expect("host")));
    // Greedy picks over 9000 logits a row (parts of 4096 on the GPU), one row with a tie
    // across parts (the lower id wins), one with a part of -inf only.
    let vocab = 9000;
    let mut logits = v.take(5 * vocab, 3.0);
    logits[2 * vocab + 7] = 4.0;
    logits[2 * vocab + 8500] = 4.0;
    logits[3 * vocab..3 * vocab + 4096].fill(f32::NEG_INFINITY);
    let picks = b
        .greedy(&tensor(b, 5, vocab, logits), vocab)
        .expect("greedy");
    out.push((
        "greedy".into(),
        picks.iter().flat_map(|&(t, lp)| [t as f32, lp]).collect(),
    ));
    out.push((
        "select_rows".into(),
        b.to_host(&b.select_rows(&x, &[17, 0, 5, 5]).expect("select"))
            .expect("host"),
    ));
    let picked = b.select_rows(&x, &[3, 1, 2]).expect("select");
    let mut acc = b.select_rows(&x, &[0, 1, 2, 3]).expect("select");
    b.scatter_add_rows(&mut acc, &picked, &[1, 1, 3])
        .expect("scatter_add_rows");
    out.push(("scatter_add_rows".into(), b.to_host(&acc).expect("host")));

    // MoE: 4 experts of width 8, top-2 routing over the 18 rows.
    let experts: Vec<ExpertWeights<B>> = (0..4)
        .map(|_| ExpertWeights {
            gate_up: matrix(b, &mut v, 16, hidden),
            down: matrix(b, &mut v, hidden, 8),
        })
        .collect();
    let routing = top2_of(4, rows);
    out.push((
        "moe".into(),
        b.to_host(&b.moe_experts(&x, &routing, &experts).expect("moe"))
            .expect("host"),
    ));
    // 3 tokens of 2056 values (6 routing slots): matrix-vector products, gate and up rows
    // in eight parts a row of two loads a lane, the fifth part one chunk, three empty.
    out.push(moe_row(b, &mut v, "moe_few_long_rows", 4, 3, 2056, 8));
    // One token (2 slots, a group each: the batch-1 kernels) of 2056 values over experts of
    // width 1032: gate and up rows in four parts of four loads a lane, the third one chunk;
    // down rows in two rounds of 3 loads a lane, the second of 33 chunks.
    out.push(moe_row(b, &mut v, "moe_one_token", 4, 1, 2056, 1032));
    // 40 tokens (80 routing slots): the grouped GEMMs, like the 18 rows above.
    let many = 40;
    let x_many = tensor(b, many, hidden, v.take(many * hidden, 1.0));
    let routing_many = top2_of(4, many);
    out.push((
        "moe_grouped".into(),
        b.to_host(
            &b.moe_experts(&x_many, &routing_many, &experts)
                .expect("moe"),
        )
        .expect("host"),
    ));

    // 600 tokens (1200 slots: on Hopper the wide tiles) over experts whose widths are not
    // multiples of a tile: hidden 72 and width 136 leave a last k step of 8 values in both
    // GEMMs and a last column block of 8 gate/up columns (of 72 down rows).
    out.push(moe_row(b, &mut v, "moe_wide_tiles", 4, 600, 72, 136));

    // 8192 tokens (16384 slots) over 64 experts of width 136 and hidden 264: ~150 wide row
    // tiles of three column blocks each, ~450 (tile, column) items a GEMM, more than two
    // blocks an SM hold at once (so a persistent GEMM's blocks would walk several, CUDA_NOTES
    // v48); last column blocks partial in both GEMMs.
    out.push(moe_row(b, &mut v, "moe_walked_tiles", 64, 8192, 264, 136));

    // Routed where the logits are: 8 experts of width 128, top-2, over 1 token (2 slots, a
    // group each), 4 tokens (8 slots: matrix-vector path), 10 (20 slots: grouped GEMMs, one row tile an expert), 300 (600
    // slots: several row tiles an expert, two column tiles, eight k steps; on Hopper the
    // narrow tiles of a decode batch) and 600 (1200 slots: on Hopper the wide tiles, as a
    // prompt's). Then 80 experts over 4 and 300 tokens: the placement's scan over three
    // warps of experts. Inputs are multiples of 1/8 and router weights of ±1/8, so every
    // logit is exact in f32 and both backends rank the experts alike.
    for (num_experts, token_counts) in [(8, &[1, 4, 10, 300, 600][..]), (80, &[4, 300][..])] {
        routed_outputs(b, &mut v, num_experts, token_counts, &mut out);
    }

    // Attention over the paged cache, blocks scattered: a 9-row prefill, decode rows at
    // positions 13, 150 (three splits of the grouped decode kernel) and 2100 (34 splits:
    // attention_combine's path for more than 32), chunked prefills of 8 rows at 20, of 5
    // rows at 45 and of 70 rows at 100 (query tiles across key tiles), a 40-row prefill
    // (several key tiles of the CUDA-core kernel) and a 200-row one (four query and key
    // tiles of the tensor-core kernel, so key slots are found ahead).
    let (heads, kv_heads, block_size) = (4, 2, 4);
    let num_blocks = 800;
    let spec = KvSpec {
        num_blocks,
        block_size,
        num_kv_heads: kv_heads,
        head_dim,
    };
    let mut store = b.kv_store(&spec).expect("store");
    let layout: [(usize, usize); 9] = [
        (9, 0),
        (1, 13),
        (1, 2100),
        (8, 20),
        (40, 0),
        (5, 45),
        (1, 150),
        (200, 0),
        (70, 100),
    ];
    let mut free: Vec<u32> = (0..num_blocks as u32)
        .map(|i| (i * 37) % num_blocks as u32)
        .collect();
    let tables: Vec<Vec<BlockId>> = layout
        .iter()
        .map(|&(n, first)| {
            let blocks = (first + n).div_ceil(block_size);
            free.drain(..blocks).map(BlockId).collect()
        })
        .collect();
    let mut next_row = 0;
    let seqs: Vec<AttentionSeq<'_>> = layout
        .iter()
        .zip(&tables)
        .map(|(&(n, first), table)| {
            let seq = AttentionSeq {
                rows: next_row..next_row + n,
                first_position: first,
                block_table: table,
            };
            next_row += n;
            seq
        })
        .collect();
    let rows = next_row;
    let width = kv_heads * head_dim;
    let mut slots = Vec::new();
    for seq in &seqs {
        let last = seq.first_position + seq.rows.len();
        slots.extend(
            (0..last)
                .map(|p| seq.block_table[p / block_size].0 as usize * block_size + p % block_size),
        );
    }
    let k = tensor(b, slots.len(), width, v.take(slots.len() * width, 1.0));
    let vv = tensor(b, slots.len(), width, v.take(slots.len() * width, 1.0));
    b.write_kv(&mut store, &k, &vv, &slots).expect("write_kv");
    let read = b.read_kv(&store, &slots[..5]).expect("read_kv");
    out.push(("read_kv".into(), [read.k, read.v].concat()));
    let q = tensor(
        b,
        rows,
        heads * head_dim,
        v.take(rows * heads * head_dim, 1.0),
    );
    let batch = AttentionBatch {
        seqs: &seqs,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        block_size,
    };
    out.push((
        "attention".into(),
        b.to_host(&b.attention(&q, &store, &batch).expect("attention"))
            .expect("host"),
    ));
    out
}

/// The GPU comparison's inputs, built and run on the CPU backend: a shape or routing mistake
/// in them fails here, before a GPU run is spent on it (`routed_outputs` checks its counters).
#[test]
fn every_kernel_input_runs_on_the_cpu_backend() {
    for head_dim in [16, 128] {
        let outputs = run_ops(&CpuBackend, head_dim);
        assert!(outputs.iter().all(|(_, values)| !values.is_empty()));
    }
}

#[test]
fn every_gpu_kernel_matches_the_cpu_backend() {
    if cuda_or_skip("every_gpu_kernel_matches_the_cpu_backend").is_none() {
        return;
    }
    let gpu = CudaBackend::new(0).expect("cuda backend");
    let mut failed = Vec::new();
    // Decode rows: 16 and 24 fill part of the split kernel's lanes, 128 all, 160 goes past
    // every prefill kernel (so prefill rows take the split kernel too). Prefill rows: 16 and
    // 128 run on the tensor cores, 24 on the CUDA-core tiled kernel.
    for head_dim in [16, 24, 128, 160] {
        let want = run_ops(&CpuBackend, head_dim);
        let got = run_ops(&gpu, head_dim);
        for ((name, c), (_, g)) in want.iter().zip(&got) {
            assert_eq!(c.len(), g.len(), "{name}");
            let worst = worst_relative_error(c, g, c.len());
            eprintln!("head_dim {head_dim} {name}: worst relative error {worst:.2e}");
            if worst > RELATIVE_TOLERANCE {
                failed.push(format!("head_dim {head_dim} {name}: {worst:.2e}"));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// `Some` where NCCL loads (after [`cuda_or_skip`]); fails instead under `TANDEM_REQUIRE_CUDA`.
fn nccl_or_skip(test: &str) -> Option<()> {
    cuda_or_skip(test)?;
    match tandem_engine::cuda::nccl_probe() {
        Ok(()) => Some(()),
        Err(reason) if std::env::var_os("TANDEM_REQUIRE_CUDA").is_some() => {
            panic!("{test}: NCCL required but unavailable: {reason}")
        }
        Err(reason) => {
            eprintln!("skipping {test}: {reason}");
            None
        }
    }
}

fn nccl_group(backends: &[CudaBackend]) -> Vec<Box<dyn Collective<CudaBackend>>> {
    NcclCollective::group(backends)
        .expect("nccl group")
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Collective<CudaBackend>>)
        .collect()
}

/// A one-rank NCCL group: every collective runs through NCCL (all-to-all as grouped self
/// send/recv) and must hand back what it was given.
#[test]
fn nccl_single_rank_collectives_run_end_to_end() {
    if nccl_or_skip("nccl_single_rank_collectives_run_end_to_end").is_none() {
        return;
    }
    let b = CudaBackend::new(0).expect("cuda backend");
    let comm = nccl_group(std::slice::from_ref(&b)).remove(0);
    let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    let mut x = b.upload_tensor(4, 3, data.clone()).expect("upload");
    comm.all_reduce_sum(&b, &mut x).expect("all_reduce");
    assert_eq!(b.to_host(&x).expect("host"), data);
    let gathered = comm.all_gather(&b, &x).expect("all_gather");
    assert_eq!(b.to_host(&gathered).expect("host"), data);
    let (moved, counts) = comm.all_to_all_v(&b, &x, &[4]).expect("all_to_all_v");
    assert_eq!(counts, vec![4]);
    assert_eq!(b.to_host(&moved).expect("host"), data);
    let host = comm
        .all_to_all_host(&b, vec![vec![1.0, 2.0, 3.0]])
        .expect("all_to_all_host");
    assert_eq!(host, vec![vec![1.0, 2.0, 3.0]]);
    comm.barrier().expect("barrier");
}

/// Tensor- and expert-parallel models on the GPU: one rank through NCCL, and two expert
/// ranks sharing one GPU through the host collective, against the unsharded GPU model.
#[test]
fn sharded_models_on_the_gpu_match_one_gpu() {
    if nccl_or_skip("sharded_models_on_the_gpu_match_one_gpu").is_none() {
        return;
    }
    let dir = bf16_copy(&fixture("qwen3-moe-f32"));
    let new_gpu = || CudaBackend::new(0).expect("cuda backend");
    let mut one = engine(&dir, new_gpu());
    let mut cpu = engine(&dir, CpuBackend);
    let vocab = one.model().config().vocab_size;
    let num_experts = one.model().config().moe.num_experts;
    let config = EngineConfig {
        num_blocks: 256,
        ..EngineConfig::default()
    };
    let tp_backends = vec![new_gpu()];
    let tp_comms = nccl_group(&tp_backends);
    let tp = load_tensor_parallel(&dir, tp_backends, tp_comms, &mut |_| {}).expect("tp=1");
    let ep_backend = new_gpu();
    let ep_comm = nccl_group(std::slice::from_ref(&ep_backend)).remove(0);
    let expert = Parallelism::Expert {
        rank: 0,
        placement: ExpertPlacement::round_robin(num_experts, 1),
    };
    let ep = Model::load_rank(&dir, ep_backend, expert, Some(ep_comm), &mut |_| {}).expect("ep=1");
    for (name, model) in [("tp=1 nccl", tp), ("ep=1 nccl", ep)] {
        let mut sharded = Engine::new(model, None, config).expect("engine");
        for (len, salt) in [(7, 1), (40, 2)] {
            let p = prompt(len, salt);
            let rows = relative_l2_by_row(
                &one.score(&p).expect("one gpu"),
                &sharded.score(&p).expect("sharded"),
                vocab,
            );
            let worst = rows.iter().copied().fold(0.0, f32::max);
            eprintln!("{name} prompt {len}: worst row relative L2 {worst:.2e}");
            assert!(worst <= ROW_LOGIT_TOLERANCE, "{name} prompt {len}: {worst}");
        }
    }

    // Two expert ranks on one GPU: NCCL cannot, so they talk through the host collective.
    let sharding = Sharding {
        expert_parallel: 2,
        ..Sharding::default()
    };
    let models = load_ranks(&dir, vec![new_gpu(), new_gpu()], &sharding, &mut |_| {})
        .expect("ep=2 on one gpu");
    let mut group = EngineGroup::new(models, None, config).expect("engines");
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(5 + 9 * i, i as u32)).collect();
    let want = batched_greedy(&mut one, &prompts, 10);
    for (i, p) in prompts.iter().enumerate() {
        let stop = StopCriteria {
            ignore_eos: true,
            ..StopCriteria::max_new_tokens(10)
        };
        group
            .add_request(SeqId(i as u64), p.clone(), SamplingParams::greedy(), stop)
            .expect("request");
    }
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    while group.has_work() {
        for event in group.step().expect("step").events {
            got.entry(event.seq.0).or_default().push(event.token);
        }
    }
    for (i, (p, w)) in prompts.iter().zip(&want).enumerate() {
        let g = &got[&(i as u64)];
        if let Some(at) = w.iter().zip(g).position(|(a, b)| a != b) {
            let context: Vec<u32> = p.iter().chain(&w[..at]).copied().collect();
            let margin = relative_margin(&mut cpu, &context, vocab);
            assert!(
                margin < 2.0 * RELATIVE_TOLERANCE,
                "ep=2 prompt {i}: token {at} differs with a clear margin {margin:.2e}"
            );
        }
    }
}
