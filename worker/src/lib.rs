//! A Tandem worker: one process that serves the prefill or the decode role over weights
//! loaded once, and can be switched between them (`tandemctl move`). The role binaries
//! `tandem-prefill-worker` and `tandem-decode-worker` start it in their role. Here too are
//! what both roles share: flags, model loading, conversions between the engine's types and the
//! internal protos, and the error type their RPCs answer with.

mod args;
mod convert;
mod decode;
pub mod engine_loop;
mod error;
mod host;
mod info;
mod kv_events;
mod metrics;
mod prefill;
mod serve;

pub use args::{WorkerArgs, device_choice};
pub use convert::{finish_reason, logprobs_from_proto, sampling_params, token_logprob};
pub use error::WorkerError;
pub use serve::{ServeError, run, serve_main};
