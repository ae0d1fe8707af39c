//! Generates the strata.v1 gRPC code with protox (a pure-Rust protobuf
//! compiler), so that a fresh machine needs no `protoc` to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["strata/v1/strata.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        // Payload fields decode as `Bytes` slices of the receive buffer
        // instead of fresh `Vec`s: one copy less on the data path.
        .bytes(".strata.v1")
        .compile_fds(fds)?;
    Ok(())
}
