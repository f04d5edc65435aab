//! What the prefill and decode workers share: their common flags, model loading and
//! description, conversions between the engine's types and the internal protos, the error
//! type their RPCs answer with, and the gRPC server loop. Role-specific engine threads and
//! services live in `tandem-prefill-worker` and `tandem-decode-worker`.

mod args;
mod convert;
pub mod engine_loop;
mod error;
mod info;
mod serve;

pub use args::{WorkerArgs, device_choice};
pub use convert::{finish_reason, logprobs_from_proto, sampling_params, token_logprob};
pub use error::WorkerError;
pub use info::WorkerInfoService;
pub use serve::{
    LoadedWorker, ServeError, Serving, bind, load_model, main_with, routes, serve_grpc,
};
