//! Calibration: fit a hardware profile's efficiencies to Tandem's own kernels, from the CUDA
//! engine bench's measurements (`TANDEM_BENCH_JSON=… cargo bench -p tandem-engine --bench
//! cuda`), then check the cost model's predictions against every measured step.

use serde::Deserialize;

use crate::SimError;
use crate::cost::CostModel;
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
    pub tokens: f64,
    pub seconds: f64,
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

/// Fits `base` (the GPU's datasheet profile, for its links and memory size) to `run`. Peak
/// rates become the measured ones (the copy's bytes moved per second, the GEMM's FLOP/s);
/// memory efficiency, the fixed host time per step and the host time per sequence come from
/// least squares through the decode steps (seconds = bytes / (rate x efficiency) + fixed +
/// batch x per sequence), the prefill efficiency from the prefills. Launch costs are inside
/// those terms (per-expert launches grow with the experts touched, like the bytes, so the
/// steps cannot tell them apart).
pub fn calibrate(base: &HardwareProfile, run: &BenchRun) -> Result<Calibration, SimError> {
    if run.decode.len() < 3 || run.prefill.is_empty() {
        return Err(SimError::Input(
            "calibration needs at least three decode steps and one prefill".into(),
        ));
    }
    let model = ModelShape::from_config("bench", &run.config)?;
    let mut profile = base.clone();
    profile.source = format!("calibrated on {} from Tandem's engine bench", run.device);
    profile.hbm_gbps = run.copy_bytes_per_s / 1e9;
    profile.fp8_tflops = base.fp8_tflops * run.gemm_flops / 1e12 / base.bf16_tflops;
    profile.bf16_tflops = run.gemm_flops / 1e12;
    profile.memory_efficiency = 1.0;
    profile.gemm_efficiency = DECODE_GEMM_EFFICIENCY;
    profile.launch_us = 0.0;
    profile.launches_per_expert = 0.0;
    profile.step_overhead_us = 0.0;
    profile.per_sequence_us = 0.0;
    profile.prefill_efficiency = None;
    let ideal = CostModel {
        model: model.clone(),
        hardware: profile.clone(),
    };
    let features: Vec<[f64; 3]> = run
        .decode
        .iter()
        .map(|d| {
            [
                ideal.decode_step(1, d.batch, run.context).memory_s,
                1.0,
                d.batch,
            ]
        })
        .collect();
    let seconds: Vec<f64> = run.decode.iter().map(|d| d.seconds).collect();
    let [per_memory_s, fixed_s, per_sequence_s] = least_squares(&features, &seconds);
    profile.memory_efficiency = (1.0 / per_memory_s).clamp(0.01, 1.0);
    profile.step_overhead_us = (fixed_s * 1e6).max(0.0);
    profile.per_sequence_us = (per_sequence_s * 1e6).max(0.0);
    let with_overheads = CostModel {
        model: model.clone(),
        hardware: profile.clone(),
    };
    let efficiencies: Vec<f64> = run
        .prefill
        .iter()
        .map(|p| {
            let cost = with_overheads.prefill(1, p.tokens, p.tokens);
            let busy = (p.seconds - cost.launch_s).max(cost.compute_s * 1e-3);
            profile.gemm_efficiency * cost.compute_s / busy
        })
        .collect();
    profile.prefill_efficiency =
        Some((efficiencies.iter().sum::<f64>() / efficiencies.len() as f64).clamp(1e-4, 1.0));
    let fitted = CostModel {
        model,
        hardware: profile.clone(),
    };
    let mut checks: Vec<Check> = run
        .decode
        .iter()
        .map(|d| Check {
            operation: format!("decode step, batch {}", d.batch),
            measured_s: d.seconds,
            predicted_s: fitted.decode_step(1, d.batch, run.context).seconds(),
        })
        .collect();
    checks.extend(run.prefill.iter().map(|p| Check {
        operation: format!("prefill {} tokens", p.tokens),
        measured_s: p.seconds,
        predicted_s: fitted.prefill(1, p.tokens, p.tokens).seconds(),
    }));
    Ok(Calibration { profile, checks })
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

    /// A run made by the cost model itself from known efficiencies is fitted back to them.
    #[test]
    fn a_run_from_known_efficiencies_is_fitted_back_to_them() {
        let base = HardwareProfile::load("h100").expect("h100");
        let config = crate::fixtures::config("qwen3-30b-a3b");
        let mut truth = base.clone();
        truth.bf16_tflops = 700.0;
        truth.hbm_gbps = 6000.0;
        truth.memory_efficiency = 0.7;
        truth.gemm_efficiency = DECODE_GEMM_EFFICIENCY;
        truth.prefill_efficiency = Some(0.05);
        truth.launch_us = 0.0;
        truth.launches_per_expert = 0.0;
        truth.step_overhead_us = 2000.0;
        truth.per_sequence_us = 80.0;
        let cost = CostModel {
            model: ModelShape::from_config("q", &config).expect("shape"),
            hardware: truth,
        };
        let run = BenchRun {
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
            prefill: vec![PrefillRun {
                tokens: 8192.0,
                seconds: cost.prefill(1, 8192.0, 8192.0).seconds(),
            }],
        };
        let fit = calibrate(&base, &run).expect("fit");
        assert!(
            (fit.profile.memory_efficiency - 0.7).abs() < 0.02,
            "{:?}",
            fit.profile
        );
        assert!(
            (fit.profile.step_overhead_us - 2000.0).abs() < 50.0,
            "{:?}",
            fit.profile
        );
        assert!(
            (fit.profile.per_sequence_us - 80.0).abs() < 2.0,
            "{:?}",
            fit.profile
        );
        assert!(
            fit.checks.iter().all(|c| c.relative_error().abs() < 0.05),
            "{:?}",
            fit.checks
        );
    }

    /// The check, kept: the profile fitted to the H100 engine bench measured on the
    /// GPU machine (sim/calibration/) predicts every measured step within 20%.
    #[test]
    fn the_h100_calibration_predicts_every_measured_step_within_20_percent() {
        let path = format!(
            "{}/calibration/h100-engine-bench.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let run: BenchRun =
            serde_json::from_str(&std::fs::read_to_string(path).expect("bench")).expect("json");
        let base = HardwareProfile::load("h100").expect("h100");
        let fit = calibrate(&base, &run).expect("fit");
        for check in &fit.checks {
            assert!(check.relative_error().abs() <= 0.2, "{check:?}");
        }
    }
}
