//! Generates the agent API from `vmpod/agent/v1/agent.proto`.
//!
//! protoc comes from Debian's `protobuf-compiler` (installed by
//! `scripts/install-deps`); `PROTOC` overrides the path.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "vmpod/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["."])
        .map_err(|e| {
            format!("generating the agent API from {proto} failed (is protoc installed? scripts/install-deps installs Debian's protobuf-compiler): {e}").into()
        })
}
