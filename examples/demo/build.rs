//! Compiles the demo's two protos with protox (a Rust protobuf compiler, so no system `protoc`)
//! into prost messages and tonic server and client stubs.

const PROTOS: &[&str] = &["grpc/health/v1/health.proto", "weft/demo/v1/demo.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure().build_transport(false).compile_fds(fds)?;
    Ok(())
}
