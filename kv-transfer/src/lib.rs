//! Moving KV cache between workers, layer by layer.
//!
//! A prefill worker sends one [`LayerFrame`] per (destination, layer) holding that layer's K
//! and V for a whole request, then one [`DoneFrame`] with the first sampled token. Frames are
//! length-prefixed and checked on arrival; a frame whose body is wrong is reported as an
//! [`InvalidFrame`] for its transfer, never written anywhere. The transport is TCP; an NCCL
//! transport joins it with the CUDA backend.

mod error;
mod frame;
mod tcp;

pub use error::TransferError;
pub use frame::{DoneFrame, Dtype, Frame, FrameCodec, InvalidFrame, KvShape, LayerFrame, Received};
pub use tcp::{KvListener, TcpKvSender};
