//! Compiles `mesh-ebpf` (aya-build), which `lacewing-node` embeds.
//!
//! The eBPF build needs the nightly's rust-src and bpf-linker. When either is
//! missing the build stops with one line that says what to run, instead of a
//! page of cargo output from deep inside the nested build.

use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo::rerun-if-env-changed=PATH");
    if let Err(missing) = check_toolchain() {
        println!("cargo::error={missing}: run `cargo xtask setup`");
        return;
    }
    let ebpf = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../../mesh-ebpf"),
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()) {
        println!("cargo::error=building mesh-ebpf failed: {err:#}");
    }
}

fn check_toolchain() -> Result<(), &'static str> {
    if !on_path("bpf-linker") {
        return Err("bpf-linker is not installed");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .ok_or("the nightly toolchain is not installed")?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err("the nightly toolchain has no rust-src component");
    }
    Ok(())
}

include!("../build-support/on_path.rs");
