//! Compiles the controller-node gRPC protocol (tonic-build).

use std::{env, path::PathBuf};

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

fn on_path(tool: &str) -> bool {
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .any(|dir| dir.join(tool).is_file())
}
