//! Compiles `proto/` (at the workspace root) into Rust with protox, a protobuf compiler written in
//! Rust, so building needs no `protoc` on the machine; tonic-prost-build generates the messages,
//! the client and the server from the compiled descriptors. Each package's encoded descriptor set
//! is also written out, for its server's gRPC reflection.

use std::path::PathBuf;

use protox::prost::Message;

const PROTOS: &[&str] = &[
    "pricing/v1/pricing.proto",
    "broker/v1/broker.proto",
    "mesh/v1/mesh.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for proto in PROTOS {
        println!(
            "cargo:rerun-if-changed={}",
            proto_root.join(proto).display()
        );
    }

    // `compile` includes imports and source info (comments), which reflection clients show.
    // Each package gets its own descriptor set, so a server's reflection lists only its services.
    for proto in PROTOS {
        let package = proto.split('/').next().unwrap_or(proto);
        let own = protox::compile([proto], [&proto_root])?;
        std::fs::write(
            out_dir.join(format!("{package}_descriptor.bin")),
            own.encode_to_vec(),
        )?;
    }
    let descriptors = protox::compile(PROTOS, [&proto_root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Payloads are handed between the broker's index, its store and its streams without copies.
        .bytes(".causeway.broker.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
