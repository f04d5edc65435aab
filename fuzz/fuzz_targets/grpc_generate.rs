#![no_main]
// A protobuf GenerateRequest through the router's gRPC front door.
mod harness;

libfuzzer_sys::fuzz_target!(|message: &[u8]| {
    harness::harness().grpc_message(message);
});
