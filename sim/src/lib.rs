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

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Input(String),
}
