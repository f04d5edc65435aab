use proptest::prelude::*;

use super::*;

const LIMIT: usize = 1 << 20;

fn layer_frame(tokens: u32, heads: u32, dim: u32, blocks: Vec<u32>) -> Frame {
    let n = (tokens * heads * dim) as usize;
    let k: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let v: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
    Frame::Layer(LayerFrame::from_f32(
        TransferId(7),
        3,
        KvShape {
            num_tokens: tokens,
            kv_heads: heads,
            head_dim: dim,
        },
        blocks.into_iter().map(KvBlockId).collect(),
        &k,
        &v,
    ))
}

fn encode(frames: &[Frame]) -> BytesMut {
    let mut codec = FrameCodec::new(LIMIT);
    let mut buf = BytesMut::new();
    for f in frames {
        codec.encode(f.clone(), &mut buf).expect("encodes");
    }
    buf
}

fn decode_all(mut buf: BytesMut) -> Result<Vec<Received>, TransferError> {
    let mut codec = FrameCodec::new(LIMIT);
    let mut out = Vec::new();
    while let Some(item) = codec.decode(&mut buf)? {
        out.push(item);
    }
    Ok(out)
}

#[test]
fn layer_frame_round_trips_its_f32_values() {
    let frame = layer_frame(3, 2, 4, vec![5, 9]);
    let decoded = decode_all(encode(std::slice::from_ref(&frame))).expect("decodes");
    assert_eq!(decoded, vec![Ok(frame.clone())]);
    let Frame::Layer(layer) = frame else {
        unreachable!()
    };
    let (k, v) = layer.to_f32().expect("f32");
    assert_eq!(k.len(), 24);
    assert_eq!(v[5], -5.0);
}

#[test]
fn bad_body_fails_its_transfer_and_the_stream_goes_on() {
    let good = Frame::Done(DoneFrame {
        transfer: TransferId(8),
        first_token: 42,
        logprob: -0.5,
        top: vec![(42, -0.5), (3, -1.0)],
        kv_in_place: true,
    });
    let mut buf = encode(&[layer_frame(2, 1, 2, vec![1]), good.clone()]);
    // Shrink num_tokens in the first frame's header: its payload no longer matches.
    let num_tokens_at = ENVELOPE_LEN + 8 + 4 + 1;
    buf[num_tokens_at] = 1;
    let decoded = decode_all(buf).expect("envelopes are intact");
    let Err(bad) = &decoded[0] else {
        panic!("first frame must be invalid: {decoded:?}")
    };
    assert_eq!(bad.transfer, Some(TransferId(7)));
    assert!(bad.reason.contains("needs 16"), "{}", bad.reason);
    assert_eq!(decoded[1], Ok(good));
}

#[test]
fn unknown_done_flags_fail_the_transfer() {
    let done = Frame::Done(DoneFrame {
        transfer: TransferId(5),
        first_token: 1,
        logprob: 0.0,
        top: Vec::new(),
        kv_in_place: true,
    });
    let mut buf = encode(&[done]);
    let flags_at = ENVELOPE_LEN + 8 + 4 + 4;
    assert_eq!(buf[flags_at], 1);
    buf[flags_at] = 0x81;
    let decoded = decode_all(buf).expect("the envelope is intact");
    let Err(bad) = &decoded[0] else {
        panic!("unknown flags must be refused: {decoded:?}")
    };
    assert_eq!(bad.transfer, Some(TransferId(5)));
    assert!(bad.reason.contains("unknown flags 0x81"), "{}", bad.reason);
}

#[test]
fn oversize_frame_and_bad_magic_end_the_stream() {
    let buf = encode(&[layer_frame(64, 8, 64, vec![0])]);
    let mut small = FrameCodec::new(1024);
    let err = small.decode(&mut buf.clone()).unwrap_err();
    assert!(
        err.to_string().contains("over the limit of 1024 bytes"),
        "{err}"
    );
    let mut corrupt = buf;
    corrupt[0] ^= 0xff;
    assert!(matches!(
        decode_all(corrupt),
        Err(TransferError::Corrupt(_))
    ));
}

#[test]
fn encoder_refuses_frames_over_the_limit() {
    let mut codec = FrameCodec::new(100);
    let err = codec
        .encode(layer_frame(4, 2, 8, vec![0]), &mut BytesMut::new())
        .unwrap_err();
    assert!(matches!(
        err,
        TransferError::FrameTooLarge { limit: 100, .. }
    ));
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_all(BytesMut::from(&bytes[..]));
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_envelope_never_panic(
        kind in 0u8..4,
        body in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut buf = BytesMut::new();
        buf.put_u32_le(MAGIC);
        buf.put_u8(kind);
        buf.put_u64_le(body.len() as u64);
        buf.extend_from_slice(&body);
        let decoded = decode_all(buf).expect("envelope is valid");
        prop_assert_eq!(decoded.len(), 1);
    }

    #[test]
    fn frames_round_trip_split_at_any_byte(
        tokens in 1u32..5, heads in 1u32..3, dim in 1u32..5,
        blocks in proptest::collection::vec(any::<u32>(), 0..4),
        split in 0usize..400,
    ) {
        let frames = vec![layer_frame(tokens, heads, dim, blocks), Frame::Done(DoneFrame {
            transfer: TransferId(1), first_token: 2, logprob: -3.0, top: vec![], kv_in_place: false,
        })];
        let whole = encode(&frames);
        let split = split.min(whole.len());
        let mut codec = FrameCodec::new(LIMIT);
        let mut buf = BytesMut::from(&whole[..split]);
        let mut out = Vec::new();
        while let Some(item) = codec.decode(&mut buf).expect("valid") { out.push(item); }
        buf.extend_from_slice(&whole[split..]);
        while let Some(item) = codec.decode(&mut buf).expect("valid") { out.push(item); }
        prop_assert_eq!(out, frames.into_iter().map(Ok).collect::<Vec<_>>());
    }
}
