//! The prefill role: prompts batched under a token budget on a dedicated engine thread, each
//! layer's KV pushed to the decode worker named in the request's ticket as soon as that layer
//! is computed, then the first sampled token.

mod engine_thread;
mod service;

pub(crate) use engine_thread::{Command, EngineThread};
pub(crate) use service::PrefillService;
