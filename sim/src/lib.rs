//! Tandem at a scale no machine here has, on paper: a discrete-event simulator of a cluster
//! (router policy, TP prefill, layer-by-layer KV transfer, EP decode with data-parallel
//! attention) driven by per-operation costs from a hardware profile, and a planner that
//! searches prefill TP, decode EP and the P:D split. No dependency on the engine or a GPU.

pub mod calibrate;
pub mod cluster;
pub mod cost;
pub mod model;
pub mod plan;
pub mod profile;

pub use cluster::{Deployment, Outcome, RequestSpec, Workload, simulate, simulate_requests};
pub use cost::CostModel;
pub use model::ModelShape;
pub use plan::{Plan, PlanRequest, Point};
pub use profile::HardwareProfile;

/// The models and profiles shipped in this crate, for its tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::{CostModel, HardwareProfile, ModelShape};

    /// `models/<name>.json` as JSON.
    pub(crate) fn config(name: &str) -> serde_json::Value {
        let path = format!("{}/models/{name}.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).expect("model")).expect("json")
    }

    pub(crate) fn model(name: &str) -> ModelShape {
        ModelShape::from_config(name, &config(name)).expect(name)
    }

    /// `model` on the built-in profile `hardware`.
    pub(crate) fn cost(model: &str, hardware: &str) -> CostModel {
        CostModel {
            model: self::model(model),
            hardware: HardwareProfile::load(hardware).expect("profile"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Input(String),
}
