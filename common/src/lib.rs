//! Types shared by Tandem's binaries. Never depends on the engine or on CUDA.

pub mod generate;
