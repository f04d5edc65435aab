//! The wire format. Every frame is `magic u32 | kind u8 | body_len u64 | body`, little endian.
//!
//! Layer body: `transfer u64 | layer u32 | dtype u8 | num_tokens u32 | kv_heads u32 |
//! head_dim u32 | n_blocks u32 | block u32 × n_blocks | payload`, the payload being K then V,
//! each `[num_tokens, kv_heads, head_dim]`.
//! Done body: `transfer u64 | first_token u32 | logprob f32 | flags u8 | n_top u32 | (token
//! u32, logprob f32) × n_top`; flag bit 0: the KV was written in place (no layer frames).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tandem_common::ids::{KvBlockId, TransferId};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::TransferError;

const MAGIC: u32 = 0x544B_5631; // "TKV1"
const ENVELOPE_LEN: usize = 4 + 1 + 8;
const KIND_LAYER: u8 = 1;
const KIND_DONE: u8 = 2;
const LAYER_FIXED_LEN: usize = 8 + 4 + 1 + 4 + 4 + 4 + 4;
const DONE_FIXED_LEN: usize = 8 + 4 + 4 + 1 + 4;
const DONE_KV_IN_PLACE: u8 = 1;

/// Element type of a KV payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

/// Shape of one layer's K (and of its V) for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub num_tokens: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
}

/// One layer of one request's prompt KV, addressed to the destination's reserved blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFrame {
    pub transfer: TransferId,
    pub layer: u32,
    pub dtype: Dtype,
    pub shape: KvShape,
    pub blocks: Vec<KvBlockId>,
    /// K then V; its length always matches `dtype` and `shape` in a decoded frame.
    pub payload: Bytes,
}

/// The end of a transfer: the first token the prefill worker sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct DoneFrame {
    pub transfer: TransferId,
    pub first_token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
    /// The prefill worker wrote every layer straight into the reserved blocks (same GPU,
    /// shared memory), so no layer frame precedes this one.
    pub kv_in_place: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Layer(LayerFrame),
    Done(DoneFrame),
}

/// A frame whose envelope was sound but whose body was not: the transfer it names (when the
/// body got that far) fails, and the stream goes on with the next frame.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidFrame {
    pub transfer: Option<TransferId>,
    pub reason: String,
}

/// What the decoder yields for each envelope.
pub type Received = Result<Frame, InvalidFrame>;

/// Length-prefixed framing with a size limit, so a peer cannot make the receiver buffer an
/// unbounded amount.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::Bf16 => 1,
            Self::F16 => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::F32),
            1 => Some(Self::Bf16),
            2 => Some(Self::F16),
            _ => None,
        }
    }
}

impl KvShape {
    /// Values in K (and in V); `None` on overflow.
    pub fn values(&self) -> Option<usize> {
        (self.num_tokens as usize)
            .checked_mul(self.kv_heads as usize)?
            .checked_mul(self.head_dim as usize)
    }
}

impl LayerFrame {
    /// A float32 frame from host K and V rows.
    pub fn from_f32(
        transfer: TransferId,
        layer: u32,
        shape: KvShape,
        blocks: Vec<KvBlockId>,
        k: &[f32],
        v: &[f32],
    ) -> Self {
        let mut payload = BytesMut::with_capacity((k.len() + v.len()) * 4);
        for x in k.iter().chain(v) {
            payload.put_f32_le(*x);
        }
        Self {
            transfer,
            layer,
            dtype: Dtype::F32,
            shape,
            blocks,
            payload: payload.freeze(),
        }
    }

    /// K and V of a float32 frame; `None` for another dtype.
    pub fn to_f32(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        if self.dtype != Dtype::F32 {
            return None;
        }
        let mut values: Vec<f32> = self
            .payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let v = values.split_off(values.len() / 2);
        Some((values, v))
    }
}

impl Frame {
    pub fn transfer(&self) -> TransferId {
        match self {
            Self::Layer(f) => f.transfer,
            Self::Done(f) => f.transfer,
        }
    }
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }
}

impl Decoder for FrameCodec {
    type Item = Received;
    type Error = TransferError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Received>, TransferError> {
        if src.len() < ENVELOPE_LEN {
            return Ok(None);
        }
        let mut head = &src[..ENVELOPE_LEN];
        let magic = head.get_u32_le();
        let kind = head.get_u8();
        let body_len = head.get_u64_le();
        if magic != MAGIC {
            return Err(TransferError::Corrupt(format!(
                "bad magic {magic:#010x}, expected {MAGIC:#010x}"
            )));
        }
        if body_len > self.max_frame_bytes as u64 {
            return Err(TransferError::FrameTooLarge {
                len: body_len,
                limit: self.max_frame_bytes,
            });
        }
        let total = ENVELOPE_LEN + body_len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(ENVELOPE_LEN);
        let body = src.split_to(body_len as usize).freeze();
        Ok(Some(match kind {
            KIND_LAYER => decode_layer(body),
            KIND_DONE => decode_done(body),
            other => Err(InvalidFrame {
                transfer: None,
                reason: format!("unknown frame kind {other}"),
            }),
        }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = TransferError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), TransferError> {
        let (kind, body_len) = match &frame {
            Frame::Layer(f) => (
                KIND_LAYER,
                LAYER_FIXED_LEN + 4 * f.blocks.len() + f.payload.len(),
            ),
            Frame::Done(f) => (KIND_DONE, DONE_FIXED_LEN + 8 * f.top.len()),
        };
        if body_len > self.max_frame_bytes {
            return Err(TransferError::FrameTooLarge {
                len: body_len as u64,
                limit: self.max_frame_bytes,
            });
        }
        dst.reserve(ENVELOPE_LEN + body_len);
        dst.put_u32_le(MAGIC);
        dst.put_u8(kind);
        dst.put_u64_le(body_len as u64);
        match frame {
            Frame::Layer(f) => {
                dst.put_u64_le(f.transfer.0);
                dst.put_u32_le(f.layer);
                dst.put_u8(f.dtype.code());
                dst.put_u32_le(f.shape.num_tokens);
                dst.put_u32_le(f.shape.kv_heads);
                dst.put_u32_le(f.shape.head_dim);
                dst.put_u32_le(f.blocks.len() as u32);
                for b in &f.blocks {
                    dst.put_u32_le(b.0);
                }
                dst.extend_from_slice(&f.payload);
            }
            Frame::Done(f) => {
                dst.put_u64_le(f.transfer.0);
                dst.put_u32_le(f.first_token);
                dst.put_f32_le(f.logprob);
                dst.put_u8(if f.kv_in_place { DONE_KV_IN_PLACE } else { 0 });
                dst.put_u32_le(f.top.len() as u32);
                for (token, logprob) in &f.top {
                    dst.put_u32_le(*token);
                    dst.put_f32_le(*logprob);
                }
            }
        }
        Ok(())
    }
}

fn invalid(transfer: Option<TransferId>, reason: String) -> InvalidFrame {
    InvalidFrame { transfer, reason }
}

fn decode_layer(mut body: Bytes) -> Received {
    if body.len() < LAYER_FIXED_LEN {
        return Err(invalid(
            None,
            format!("layer frame body of {} bytes is too short", body.len()),
        ));
    }
    let transfer = TransferId(body.get_u64_le());
    let bad = |reason: String| invalid(Some(transfer), reason);
    let layer = body.get_u32_le();
    let dtype_code = body.get_u8();
    let dtype =
        Dtype::from_code(dtype_code).ok_or_else(|| bad(format!("unknown dtype {dtype_code}")))?;
    let shape = KvShape {
        num_tokens: body.get_u32_le(),
        kv_heads: body.get_u32_le(),
        head_dim: body.get_u32_le(),
    };
    let n_blocks = body.get_u32_le() as usize;
    if body.len() < n_blocks.saturating_mul(4) {
        return Err(bad(format!(
            "layer frame names {n_blocks} blocks but has {} bytes left",
            body.len()
        )));
    }
    let blocks = (0..n_blocks)
        .map(|_| KvBlockId(body.get_u32_le()))
        .collect();
    let expected = shape
        .values()
        .and_then(|v| v.checked_mul(2 * dtype.size()))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if body.len() != expected {
        return Err(bad(format!(
            "layer {layer} payload is {} bytes, shape {shape:?} of {dtype:?} needs {expected}",
            body.len()
        )));
    }
    Ok(Frame::Layer(LayerFrame {
        transfer,
        layer,
        dtype,
        shape,
        blocks,
        payload: body,
    }))
}

fn decode_done(mut body: Bytes) -> Received {
    if body.len() < DONE_FIXED_LEN {
        return Err(invalid(
            None,
            format!("done frame body of {} bytes is too short", body.len()),
        ));
    }
    let transfer = TransferId(body.get_u64_le());
    let first_token = body.get_u32_le();
    let logprob = body.get_f32_le();
    let flags = body.get_u8();
    if flags & !DONE_KV_IN_PLACE != 0 {
        return Err(invalid(
            Some(transfer),
            format!("done frame has unknown flags {flags:#04x}"),
        ));
    }
    let n_top = body.get_u32_le() as usize;
    if body.len() != n_top.saturating_mul(8) {
        return Err(invalid(
            Some(transfer),
            format!(
                "done frame names {n_top} alternatives but has {} bytes",
                body.len()
            ),
        ));
    }
    let top = (0..n_top)
        .map(|_| (body.get_u32_le(), body.get_f32_le()))
        .collect();
    Ok(Frame::Done(DoneFrame {
        transfer,
        first_token,
        logprob,
        top,
        kv_in_place: flags & DONE_KV_IN_PLACE != 0,
    }))
}

#[cfg(test)]
mod tests;
