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

/// Fits `base` (the GPU's datasheet profile, for its links and memory size) to `run`: peak
/// rates become the measured copy and GEMM rates; memory efficiency and launch overhead come
/// from a least-squares line through the decode steps (memory-bound: seconds = bytes / rate +
/// launches), GEMM efficiency from the prefills.
pub fn calibrate(base: &HardwareProfile, run: &BenchRun) -> Result<Calibration, SimError> {
    if run.decode.len() < 2 || run.prefill.is_empty() {
        return Err(SimError::Input(
            "calibration needs at least two decode steps and one prefill".into(),
        ));
    }
    let model = ModelShape::from_config("bench", &run.config)?;
    let mut profile = base.clone();
    profile.source = format!("calibrated on {} from Tandem's engine bench", run.device);
    profile.hbm_gbps = run.copy_bytes_per_s / 2.0 / 1e9;
    profile.fp8_tflops = base.fp8_tflops * run.gemm_flops / 1e12 / base.bf16_tflops;
    profile.bf16_tflops = run.gemm_flops / 1e12;
    profile.memory_efficiency = 1.0;
    profile.gemm_efficiency = 1.0;
    profile.launch_us = 0.0;
    let ideal = CostModel {
        model: model.clone(),
        hardware: profile.clone(),
    };
    // seconds = memory_s(ideal) / efficiency + launches_per_step * launch_s
    let launches = ideal.model.layers as f64 * crate::cost::LAUNCHES_PER_LAYER;
    let xs: Vec<f64> = run
        .decode
        .iter()
        .map(|d| ideal.decode_step(1, d.batch, run.context).memory_s)
        .collect();
    let ys: Vec<f64> = run.decode.iter().map(|d| d.seconds).collect();
    let (slope, intercept) = least_squares(&xs, &ys);
    profile.memory_efficiency = (1.0 / slope).clamp(0.01, 1.0);
    profile.launch_us = (intercept / launches * 1e6).max(0.0);
    let launch_s = profile.launch_us * 1e-6 * launches;
    let efficiencies: Vec<f64> = run
        .prefill
        .iter()
        .map(|p| {
            let ideal_s = ideal.prefill(1, p.tokens, p.tokens).compute_s;
            ideal_s / (p.seconds - launch_s).max(ideal_s)
        })
        .collect();
    profile.gemm_efficiency =
        (efficiencies.iter().sum::<f64>() / efficiencies.len() as f64).clamp(1e-4, 1.0);
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

/// Slope and intercept of the least-squares line through (xs, ys).
fn least_squares(xs: &[f64], ys: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { my / mx };
    (slope, my - slope * mx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run made by the cost model itself from known efficiencies is fitted back to them.
    #[test]
    fn a_run_from_known_efficiencies_is_fitted_back_to_them() {
        let base = HardwareProfile::load("h100").expect("h100");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!(
                "{}/models/qwen3-30b-a3b.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("model"),
        )
        .expect("json");
        let mut truth = base.clone();
        truth.hbm_gbps = 3000.0;
        truth.bf16_tflops = 700.0;
        truth.memory_efficiency = 0.7;
        truth.gemm_efficiency = 0.3;
        truth.launch_us = 5.0;
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
            decode: [1.0, 4.0, 8.0]
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
            (fit.profile.launch_us - 5.0).abs() < 0.5,
            "{:?}",
            fit.profile
        );
        assert!(
            fit.checks.iter().all(|c| c.relative_error().abs() < 0.05),
            "{:?}",
            fit.checks
        );
    }
}
