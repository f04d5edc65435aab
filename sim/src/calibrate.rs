//! Calibration: fit a hardware profile's efficiencies to Tandem's own kernels, from the CUDA
//! engine bench's measurements (`TANDEM_BENCH_JSON=… cargo bench -p tandem-engine --bench
//! cuda`), then check the cost model's predictions against every measured step.

use serde::Deserialize;

use crate::SimError;
use crate::cost::{Cost, CostModel};
use crate::model::ModelShape;
use crate::profile::HardwareProfile;

/// What the engine bench measured.
#[derive(Debug, Clone, Deserialize)]
pub struct BenchRun {
    pub device: String,
    pub config: serde_json::Value,
    pub context: f64,
    /// Device-to-device copy rate (bytes read plus written per second).
    pub copy_bytes_per_s: f64,
    /// cuBLAS bf16 GEMM rate, FLOP/s.
    pub gemm_flops: f64,
    pub decode: Vec<DecodeStep>,
    pub prefill: Vec<PrefillRun>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct DecodeStep {
    pub batch: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct PrefillRun {
    /// Tokens of the pass, over all its prompts.
    pub tokens: f64,
    /// Tokens of each prompt (runs before prompts were batched: the whole pass).
    #[serde(default)]
    pub prompt_tokens: Option<f64>,
    pub seconds: f64,
}

impl PrefillRun {
    fn prompt_tokens(&self) -> f64 {
        self.prompt_tokens.unwrap_or(self.tokens)
    }

    fn cost(&self, model: &CostModel) -> Cost {
        model.prefill(1, self.tokens, self.prompt_tokens())
    }

    fn name(&self) -> String {
        match self.prompt_tokens() {
            len if len < self.tokens => format!("prefill {} × {len} tokens", self.tokens / len),
            _ => format!("prefill {} tokens", self.tokens),
        }
    }
}

/// One measured operation beside the calibrated model's prediction.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub operation: String,
    pub measured_s: f64,
    pub predicted_s: f64,
}

impl Check {
    pub fn relative_error(&self) -> f64 {
        (self.predicted_s - self.measured_s) / self.measured_s
    }
}

/// The fitted profile and how well it predicts every measurement.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub profile: HardwareProfile,
    pub checks: Vec<Check>,
}

/// Share of the measured GEMM rate the small decode GEMMs get: the measured steps are memory
/// and host bound, so they cannot tell; this keeps decode compute from dominating.
const DECODE_GEMM_EFFICIENCY: f64 = 0.5;

/// Fits `base` (the GPU's datasheet profile, for its links and memory size) to `runs` of the
/// bench on one GPU. Peak rates become the measured ones (the runs' mean copy bytes moved per
/// second and GEMM FLOP/s); memory efficiency, the fixed host time per step and the host time
/// per sequence come from least squares through the decode steps (seconds = bytes / (rate x
/// efficiency) + fixed + batch x per sequence), and so does a time per launch where the runs
/// differ in layer count (+ launches x time per launch; one layer count cannot tell a layer's
/// overhead from the step's), the prefill efficiency from the prefills. Per-expert launches
/// grow with the experts touched, like the bytes, so the steps cannot tell them apart.
pub fn calibrate(base: &HardwareProfile, runs: &[BenchRun]) -> Result<Calibration, SimError> {
    let Some(first) = runs.first() else {
        return Err(SimError::Input("calibration needs a bench run".into()));
    };
    // Their rates are averaged: one GPU's runs only.
    if let Some(other) = runs.iter().find(|run| run.device != first.device) {
        return Err(SimError::Input(format!(
            "calibration takes runs of one GPU; got {} and {}",
            first.device, other.device
        )));
    }
    let models = runs
        .iter()
        .map(|run| ModelShape::from_config("bench", &run.config))
        .collect::<Result<Vec<_>, _>>()?;
    let seconds: Vec<f64> = runs
        .iter()
        .flat_map(|run| run.decode.iter().map(|d| d.seconds))
        .collect();
    let per_launch = models.iter().any(|m| m.layers != models[0].layers);
    let unknowns = if per_launch { 4 } else { 3 };
    if seconds.len() < unknowns || runs.iter().all(|run| run.prefill.is_empty()) {
        return Err(SimError::Input(format!(
            "calibration needs at least {unknowns} decode steps and one prefill"
        )));
    }
    let mean = |rate: fn(&BenchRun) -> f64| runs.iter().map(rate).sum::<f64>() / runs.len() as f64;
    let mut profile = base.clone();
    profile.source = format!("calibrated on {} from Tandem's engine bench", first.device);
    profile.hbm_gbps = mean(|run| run.copy_bytes_per_s) / 1e9;
    let gemm_flops = mean(|run| run.gemm_flops);
    profile.fp8_tflops = base.fp8_tflops * gemm_flops / 1e12 / base.bf16_tflops;
    profile.bf16_tflops = gemm_flops / 1e12;
    profile.memory_efficiency = 1.0;
    profile.gemm_efficiency = DECODE_GEMM_EFFICIENCY;
    profile.launch_us = 0.0;
    profile.launches_per_expert = 0.0;
    profile.step_overhead_us = 0.0;
    profile.per_sequence_us = 0.0;
    profile.prefill_efficiency = None;
    profile.prefill_exposed_reads = None;
    let costs = |profile: &HardwareProfile| -> Vec<CostModel> {
        models
            .iter()
            .map(|model| CostModel {
                model: model.clone(),
                hardware: profile.clone(),
            })
            .collect()
    };
    let ideal = costs(&profile);
    let features: Vec<[f64; 4]> = runs
        .iter()
        .zip(&ideal)
        .flat_map(|(run, cost)| {
            run.decode.iter().map(|d| {
                let launches = cost.launch_count(cost.experts_touched(1, d.batch));
                [
                    cost.decode_step(1, d.batch, run.context).memory_s,
                    1.0,
                    d.batch,
                    if per_launch { launches } else { 0.0 },
                ]
            })
        })
        .collect();
    let [per_memory_s, fixed_s, per_sequence_s, per_launch_s] = if per_launch {
        least_squares(&features, &seconds)
    } else {
        let three: Vec<[f64; 3]> = features.iter().map(|f| [f[0], f[1], f[2]]).collect();
        let [memory, fixed, sequence] = least_squares(&three, &seconds);
        [memory, fixed, sequence, 0.0]
    };
    profile.memory_efficiency = (1.0 / per_memory_s).clamp(0.01, 1.0);
    profile.step_overhead_us = (fixed_s * 1e6).max(0.0);
    profile.per_sequence_us = (per_sequence_s * 1e6).max(0.0);
    profile.launch_us = (per_launch_s * 1e6).max(0.0);
    let with_overheads = costs(&profile);
    fit_prefill(&mut profile, runs, &with_overheads);
    let fitted = costs(&profile);
    // Operations name their layer count where the runs differ in it.
    let name = |what: String, layers: usize| match per_launch {
        true => format!("{what}, {layers} layers"),
        false => what,
    };
    let mut checks = Vec::new();
    for ((run, cost), model) in runs.iter().zip(&fitted).zip(&models) {
        checks.extend(run.decode.iter().map(|d| Check {
            operation: name(format!("decode step, batch {}", d.batch), model.layers),
            measured_s: d.seconds,
            predicted_s: cost.decode_step(1, d.batch, run.context).seconds(),
        }));
        checks.extend(run.prefill.iter().map(|p| Check {
            operation: name(p.name(), model.layers),
            measured_s: p.seconds,
            predicted_s: p.cost(cost).seconds(),
        }));
    }
    Ok(Calibration { profile, checks })
}

/// The prefill's efficiency, from the prefills less their launch time (`costs`: each run's
/// model on `profile` as fitted to the decode steps, its prefill efficiency unset). Where the
/// prefills differ in FLOPs per weight byte, least squares through busy time = FLOPs /
/// (GEMM rate x efficiency) + weight bytes / HBM rate x exposed share (a 2k prompt's MoE
/// GEMMs stream every expert's weights beside the rest of its compute). Else, or where that
/// fit is not physical, the one efficiency of FLOPs over the busy time, averaged.
fn fit_prefill(profile: &mut HardwareProfile, runs: &[BenchRun], costs: &[CostModel]) {
    // (seconds at the decode GEMM efficiency, seconds at the full HBM rate, busy seconds)
    let prefills: Vec<[f64; 3]> = runs
        .iter()
        .zip(costs)
        .flat_map(|(run, cost)| {
            run.prefill.iter().map(|p| {
                let c = p.cost(cost);
                let full_rate_memory_s = c.memory_s * profile.memory_efficiency;
                let busy = (p.seconds - c.launch_s).max(c.compute_s * 1e-3);
                [c.compute_s, full_rate_memory_s, busy]
            })
        })
        .collect();
    let features: Vec<[f64; 2]> = prefills.iter().map(|p| [p[0], p[1]]).collect();
    let busy: Vec<f64> = prefills.iter().map(|p| p[2]).collect();
    let [per_compute, per_memory] = least_squares(&features, &busy);
    if prefills.len() >= 2 && per_compute > 0.0 && per_memory > 0.0 {
        profile.prefill_efficiency = Some((DECODE_GEMM_EFFICIENCY / per_compute).clamp(1e-4, 1.0));
        profile.prefill_exposed_reads = Some(per_memory);
        return;
    }
    let efficiencies: Vec<f64> = prefills
        .iter()
        .map(|p| DECODE_GEMM_EFFICIENCY * p[0] / p[2])
        .collect();
    profile.prefill_efficiency =
        Some((efficiencies.iter().sum::<f64>() / efficiencies.len() as f64).clamp(1e-4, 1.0));
}

/// Coefficients minimizing the squared error of y = features . c (normal equations, solved
/// by Gaussian elimination with partial pivoting; a singular system gives zeros).
fn least_squares<const N: usize>(features: &[[f64; N]], y: &[f64]) -> [f64; N] {
    let mut m = [[0.0; N]; N];
    let mut v = [0.0; N];
    for (row, &target) in features.iter().zip(y) {
        for i in 0..N {
            v[i] += row[i] * target;
            for j in 0..N {
                m[i][j] += row[i] * row[j];
            }
        }
    }
    for col in 0..N {
        let pivot = (col..N)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        v.swap(col, pivot);
        if m[col][col].abs() < f64::MIN_POSITIVE {
            return [0.0; N];
        }
        let (pivot_row, pivot_value) = (m[col], v[col]);
        for (i, (row, target)) in m.iter_mut().zip(v.iter_mut()).enumerate() {
            if i == col || row[col] == 0.0 {
                continue;
            }
            let factor = row[col] / pivot_row[col];
            for (cell, pivot_cell) in row.iter_mut().zip(pivot_row).skip(col) {
                *cell -= factor * pivot_cell;
            }
            *target -= factor * pivot_value;
        }
    }
    std::array::from_fn(|i| v[i] / m[i][i])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs made by the cost model itself from known efficiencies (at two layer counts, two
    /// prompt lengths each) are fitted back to them.
    #[test]
    fn runs_from_known_efficiencies_are_fitted_back_to_them() {
        let base = HardwareProfile::load("h100").expect("h100");
        let mut truth = base.clone();
        truth.bf16_tflops = 700.0;
        truth.hbm_gbps = 6000.0;
        truth.memory_efficiency = 0.7;
        truth.gemm_efficiency = DECODE_GEMM_EFFICIENCY;
        truth.prefill_efficiency = Some(0.05);
        truth.prefill_exposed_reads = Some(0.6);
        truth.launch_us = 3.0;
        truth.launches_per_expert = 0.0;
        truth.step_overhead_us = 2000.0;
        truth.per_sequence_us = 80.0;
        let runs: Vec<BenchRun> = [48, 12]
            .map(|layers| {
                let mut config = crate::fixtures::config("qwen3-30b-a3b");
                config["num_hidden_layers"] = layers.into();
                let cost = CostModel {
                    model: ModelShape::from_config("q", &config).expect("shape"),
                    hardware: truth.clone(),
                };
                BenchRun {
                    device: "test".into(),
                    config,
                    context: 2048.0,
                    copy_bytes_per_s: 6000e9,
                    gemm_flops: 700e12,
                    decode: [1.0, 8.0, 32.0, 64.0, 128.0]
                        .map(|batch| DecodeStep {
                            batch,
                            seconds: cost.decode_step(1, batch, 2048.0).seconds(),
                        })
                        .to_vec(),
                    // A 2k and an 8k prompt alone, and four 2k prompts in one pass.
                    prefill: [(2048.0, 2048.0), (8192.0, 8192.0), (8192.0, 2048.0)]
                        .map(|(tokens, len)| PrefillRun {
                            tokens,
                            prompt_tokens: Some(len),
                            seconds: cost.prefill(1, tokens, len).seconds(),
                        })
                        .to_vec(),
                }
            })
            .to_vec();
        let fit = calibrate(&base, &runs).expect("fit");
        let p = &fit.profile;
        for (fitted, want, tolerance) in [
            (p.memory_efficiency, 0.7, 0.02),
            (p.step_overhead_us, 2000.0, 50.0),
            (p.per_sequence_us, 80.0, 2.0),
            (p.launch_us, 3.0, 0.1),
            (p.prefill_efficiency.unwrap_or(0.0), 0.05, 0.002),
            (p.prefill_exposed_reads.unwrap_or(0.0), 0.6, 0.02),
        ] {
            assert!(
                (fitted - want).abs() < tolerance,
                "{fitted} vs {want}: {p:?}"
            );
        }
        assert!(
            fit.checks.iter().all(|c| c.relative_error().abs() < 0.02),
            "{:?}",
            fit.checks
        );
        // The batched pass is costed with each prompt's own attention, and named so.
        assert!(
            fit.checks
                .iter()
                .any(|c| c.operation == "prefill 4 × 2048 tokens, 12 layers"),
            "{:?}",
            fit.checks
        );
        // One layer count cannot tell a launch's time from the step's: none is fitted.
        let one = calibrate(&base, &runs[..1]).expect("fit");
        assert_eq!(one.profile.launch_us, 0.0);
        // Runs of two GPUs are refused, naming both.
        let mut mixed = runs.clone();
        mixed[1].device = "other".into();
        let error = calibrate(&base, &mixed).expect_err("two GPUs");
        assert!(error.to_string().contains("other"), "{error}");
    }

    /// The check, kept: the profile fitted to the H100 engine bench runs measured on
    /// the GPU machine (sim/calibration/: 8 layers, and 2) predicts every measured step
    /// within 20%.
    #[test]
    fn the_h100_calibration_predicts_every_measured_step_within_20_percent() {
        let runs: Vec<BenchRun> = ["h100-engine-bench.json", "h100-engine-bench-2-layers.json"]
            .iter()
            .map(|file| {
                let path = format!("{}/calibration/{file}", env!("CARGO_MANIFEST_DIR"));
                serde_json::from_str(&std::fs::read_to_string(path).expect("bench")).expect("json")
            })
            .collect();
        let base = HardwareProfile::load("h100").expect("h100");
        let fit = calibrate(&base, &runs).expect("fit");
        assert_eq!(fit.checks.len(), 12);
        for check in &fit.checks {
            assert!(check.relative_error().abs() <= 0.2, "{check:?}");
        }
    }
}
