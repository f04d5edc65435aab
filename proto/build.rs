//! Compiles the .proto files with protox (pure Rust), so building needs no `protoc`, and keeps
//! the descriptor set for gRPC reflection.

use prost::Message;

const PROTOS: &[&str] = &[
    "tandem/v1/inference.proto",
    "tandem/v1/admin.proto",
    "tandem/internal/v1/worker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tandem_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
