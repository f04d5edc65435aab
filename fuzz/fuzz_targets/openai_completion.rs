#![no_main]
// An OpenAI /v1/completions body through the router's HTTP front door.
mod harness;

libfuzzer_sys::fuzz_target!(|body: &[u8]| {
    harness::harness().openai_body(false, body);
});
