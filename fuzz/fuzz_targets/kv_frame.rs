#![no_main]
// Bytes on a KV connection through the frame decoder: frames or a clean error, never a panic
// or an allocation beyond the frame limit.
use bytes::BytesMut;
use tandem_kv_transfer::FrameCodec;
use tokio_util::codec::Decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(1 << 20);
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buffer) {}
});
