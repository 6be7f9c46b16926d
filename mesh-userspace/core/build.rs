//! Compiles the controller-node gRPC protocol (tonic-build).

fn main() {
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-changed=proto");
    if !on_path("protoc") {
        println!("cargo::error=protoc is not installed: run `cargo xtask setup`");
        return;
    }
    if let Err(err) = tonic_build::configure().compile_protos(
        &[
            "proto/lacewing/config/v1/config.proto",
            "proto/lacewing/ca/v1/ca.proto",
        ],
        &["proto"],
    ) {
        println!("cargo::error=compiling the gRPC protocol failed: {err}");
    }
}

include!("../build-support/on_path.rs");
