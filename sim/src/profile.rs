//! Hardware profiles: what one GPU and its links can do, from a datasheet or measured by
//! `tandemctl calibrate`. Rates are peaks; the efficiencies say how much of each peak
//! Tandem's kernels reach.

use serde::{Deserialize, Serialize};

use crate::SimError;

/// One GPU kind and the fabric around it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    pub name: String,
    /// `datasheet`, or where a calibration measured it.
    pub source: String,
    /// Dense bf16 tensor-core rate, TFLOP/s.
    pub bf16_tflops: f64,
    /// Dense fp8 rate, TFLOP/s (bf16 where the GPU has none).
    pub fp8_tflops: f64,
    pub hbm_gb: f64,
    /// HBM bandwidth, GB/s.
    pub hbm_gbps: f64,
    /// NVLink bandwidth per GPU per direction, GB/s.
    pub nvlink_gbps: f64,
    /// GPUs in one NVLink domain (8 for HGX, 72 for NVL72).
    pub nvlink_domain: usize,
    /// Scale-out network (InfiniBand/RoCE) per GPU per direction, GB/s.
    pub network_gbps: f64,
    pub nvlink_latency_us: f64,
    pub network_latency_us: f64,
    /// Share of the GEMM peak large GEMMs reach.
    pub gemm_efficiency: f64,
    /// Share of HBM bandwidth memory-bound kernels reach.
    pub memory_efficiency: f64,
    /// Share of link bandwidth collectives reach.
    pub link_efficiency: f64,
    /// Fixed cost per kernel launch, µs (with CUDA graphs, what remains of it).
    pub launch_us: f64,
    /// Launches per expert a layer touches: 0 for grouped expert GEMMs (one launch for all),
    /// about 3 for an engine running one GEMM per expert and projection (Tandem today).
    #[serde(default)]
    pub launches_per_expert: f64,
    /// Share of the GEMM peak a whole prefill reaches (attention included); the GEMM
    /// efficiency when unset.
    #[serde(default)]
    pub prefill_efficiency: Option<f64>,
    /// Share of a prefill's weight-read time (at the HBM rate) that adds to its compute time
    /// rather than hiding under it (calibrated: Tandem's 2k prefill streams every expert's
    /// weights beside its GEMMs); unset, a prefill takes the larger of the two.
    #[serde(default)]
    pub prefill_exposed_reads: Option<f64>,
    /// Host time per engine step beyond the GPU's (scheduling, routing round trips), µs.
    #[serde(default)]
    pub step_overhead_us: f64,
    /// Host time per running sequence per step (sampling, detokenizing, bookkeeping), µs.
    #[serde(default)]
    pub per_sequence_us: f64,
}

/// Profiles shipped with Tandem, by short name.
pub const BUILTIN_PROFILES: [(&str, &str); 4] = [
    ("h100", include_str!("../profiles/h100-sxm.json")),
    ("h200", include_str!("../profiles/h200-sxm.json")),
    ("b200", include_str!("../profiles/b200.json")),
    ("gb200-nvl72", include_str!("../profiles/gb200-nvl72.json")),
];

impl HardwareProfile {
    /// A built-in profile by short name (`h100`, `h200`, `b200`, `gb200-nvl72`), or a JSON
    /// file's path.
    pub fn load(name_or_path: &str) -> Result<Self, SimError> {
        let text = match BUILTIN_PROFILES.iter().find(|(n, _)| *n == name_or_path) {
            Some((_, json)) => (*json).to_owned(),
            None => std::fs::read_to_string(name_or_path).map_err(|e| {
                SimError::Input(format!(
                    "hardware `{name_or_path}` is neither a built-in profile ({}) nor a readable file: {e}",
                    BUILTIN_PROFILES.map(|(n, _)| n).join(", ")
                ))
            })?,
        };
        let profile: Self = serde_json::from_str(&text)
            .map_err(|e| SimError::Input(format!("hardware profile `{name_or_path}`: {e}")))?;
        profile.check()?;
        Ok(profile)
    }

    fn check(&self) -> Result<(), SimError> {
        let positive = [
            ("bf16_tflops", self.bf16_tflops),
            ("fp8_tflops", self.fp8_tflops),
            ("hbm_gb", self.hbm_gb),
            ("hbm_gbps", self.hbm_gbps),
            ("nvlink_gbps", self.nvlink_gbps),
            ("network_gbps", self.network_gbps),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(SimError::Input(format!("{field} must be > 0, got {value}")));
            }
        }
        for (field, value) in [
            ("gemm_efficiency", self.gemm_efficiency),
            ("memory_efficiency", self.memory_efficiency),
            ("link_efficiency", self.link_efficiency),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(SimError::Input(format!(
                    "{field} must be in (0, 1], got {value}"
                )));
            }
        }
        if let Some(value) = self.prefill_efficiency
            && !(value > 0.0 && value <= 1.0)
        {
            return Err(SimError::Input(format!(
                "prefill_efficiency must be in (0, 1], got {value}"
            )));
        }
        if let Some(value) = self.prefill_exposed_reads
            && !(value.is_finite() && value >= 0.0)
        {
            return Err(SimError::Input(format!(
                "prefill_exposed_reads must be >= 0, got {value}"
            )));
        }
        if self.nvlink_domain == 0 {
            return Err(SimError::Input("nvlink_domain must be >= 1".into()));
        }
        Ok(())
    }

    /// Effective GEMM rate, FLOP/s, for weights of `weight_bytes` per parameter.
    pub fn gemm_flops(&self, weight_bytes: f64) -> f64 {
        let peak = if weight_bytes <= 1.0 {
            self.fp8_tflops
        } else {
            self.bf16_tflops
        };
        peak * 1e12 * self.gemm_efficiency
    }

    /// Effective HBM bandwidth, bytes/s.
    pub fn memory_bytes_per_second(&self) -> f64 {
        self.hbm_gbps * 1e9 * self.memory_efficiency
    }

    /// Effective bandwidth (bytes/s) and latency (s) between `group` GPUs working together:
    /// NVLink inside one domain, the network beyond it.
    pub fn link(&self, group: usize) -> (f64, f64) {
        if group <= self.nvlink_domain {
            (
                self.nvlink_gbps * 1e9 * self.link_efficiency,
                self.nvlink_latency_us * 1e-6,
            )
        } else {
            (
                self.network_gbps * 1e9 * self.link_efficiency,
                self.network_latency_us * 1e-6,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_load_and_unknown_names_say_what_exists() {
        for (name, _) in BUILTIN_PROFILES {
            HardwareProfile::load(name).expect(name);
        }
        let error = HardwareProfile::load("tpu-v9").expect_err("unknown");
        assert!(error.to_string().contains("gb200-nvl72"), "{error}");
    }

    #[test]
    fn calibrated_prefill_terms_out_of_range_are_refused() {
        let mut profile = HardwareProfile::load("h100").expect("h100");
        profile.prefill_exposed_reads = Some(0.7);
        profile.check().expect("in range");
        profile.prefill_exposed_reads = Some(-0.1);
        let error = profile.check().expect_err("negative share");
        assert!(
            error.to_string().contains("prefill_exposed_reads"),
            "{error}"
        );
        profile.prefill_exposed_reads = None;
        profile.prefill_efficiency = Some(1.5);
        let error = profile.check().expect_err("over 1");
        assert!(error.to_string().contains("prefill_efficiency"), "{error}");
    }

    #[test]
    fn links_beyond_the_nvlink_domain_use_the_network() {
        let h200 = HardwareProfile::load("h200").expect("h200");
        assert!(h200.link(8).0 > 5.0 * h200.link(16).0);
        let nvl72 = HardwareProfile::load("gb200-nvl72").expect("nvl72");
        assert_eq!(nvl72.link(72), nvl72.link(2));
    }
}
