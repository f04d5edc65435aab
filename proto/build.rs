//! Compiles the .proto files with protox (pure Rust), so building needs no `protoc`, and keeps
//! the descriptor set for gRPC reflection.

use prost::Message;

/// Tandem's own services, which servers describe through reflection.
const TANDEM_PROTOS: &[&str] = &[
    "tandem/v1/inference.proto",
    "tandem/v1/admin.proto",
    "tandem/internal/v1/worker.proto",
];
/// Clients only: the part of etcd's API the registry uses.
const ETCD_PROTOS: &[&str] = &["etcd/rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in TANDEM_PROTOS.iter().chain(ETCD_PROTOS) {
        println!("cargo:rerun-if-changed={proto}");
    }
    let tandem = protox::compile(TANDEM_PROTOS, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tandem_descriptor.bin"),
        tandem.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(tandem)?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(protox::compile(ETCD_PROTOS, ["."])?)?;
    Ok(())
}
