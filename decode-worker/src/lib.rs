//! Decode worker: continuous-batching decode on a dedicated engine thread, taking prompt KV
//! pushed by prefill workers into reserved blocks (`serve`), and the single-process reference
//! run the disaggregated path must match token for token (`generate`).

mod engine_thread;
pub mod generate;
pub mod serve;
mod service;
