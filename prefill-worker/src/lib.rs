//! Prefill worker: batches queued prompts under a token budget on a dedicated engine thread,
//! runs prefill, and pushes each layer's KV to the decode worker named in the request's
//! ticket as soon as that layer is computed, then the first sampled token.

mod engine_thread;
pub mod serve;
mod service;
