// The router's checks for the test fixture's model, built once per fuzzing process.
use std::sync::OnceLock;

use tandem_router::fuzz::Harness;

pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen3-moe-f32/");
        let read = |name: &str| std::fs::read(format!("{dir}{name}")).expect("fixture");
        Harness::new(&read("tokenizer.json"), &read("tokenizer_config.json"))
    })
}
