//! The decode role: continuous batching on a dedicated engine thread over prompt KV that
//! prefill workers push into reserved blocks.

mod engine_thread;
mod service;

pub(crate) use engine_thread::{Command, EngineThread};
pub(crate) use service::{DecodeService, KvLayout, run_kv_intake};
