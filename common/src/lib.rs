//! Types shared by Tandem's binaries. Never depends on the engine or on CUDA.

pub mod error_class;
pub mod generate;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod telemetry;
pub mod tls;
