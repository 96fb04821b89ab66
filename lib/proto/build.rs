//! Compiles the contract with protox (a Rust protobuf compiler, so no system `protoc`), then
//! generates prost messages, tonic service stubs and pbjson serde impls (the proto3 JSON mapping)
//! from the same descriptor set.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &["weft/proxy/v1/config.proto", "weft/identity/v1/ca.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    tonic_prost_build::configure()
        .build_transport(false)
        // Deterministic order in /config output and in tests.
        .btree_map(".")
        .compile_fds(fds.clone())?;

    let descriptors = fds.encode_to_vec();
    std::fs::write(out.join("descriptors.bin"), &descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .out_dir(&out)
        .btree_map(["."])
        .build(&[".weft.proxy.v1"])?;
    Ok(())
}
