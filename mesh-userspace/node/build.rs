//! Compiles `mesh-ebpf` (aya-build), which `lacewing-node` embeds, and
//! links the daemon with packed relative relocations and, in release
//! builds, the code that runs laid out together.
//!
//! The eBPF build needs the nightly's rust-src and bpf-linker. When either is
//! missing the build stops with one line that says what to run, instead of a
//! page of cargo output from deep inside the nested build.
//!
//! The other steps are about the daemon's resident memory, which is mostly
//! its own file's pages:
//! - The kernel object is built with full debug info because bpf-linker
//!   derives its BTF from it; the loader reads BTF, never DWARF. The DWARF
//!   and its relocations were 80 % of the embedded object (about 500 KiB
//!   of the daemon's read-only data), so they are stripped after the build.
//! - A position-independent executable carries one 24-byte `.rela.dyn`
//!   entry per pointer in its read-only data (vtables, above all); the
//!   loader reads them all at start (about 480 KiB). `DT_RELR` packs them
//!   into bitmaps (glibc 2.36, binutils 2.38); the daemon stays PIE.
//! - The functions that ran in a profile are linked first, together (see
//!   `code_layout`).

use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    code_layout();
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
        return;
    }
    let object =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("lacewing");
    if let Err(err) = strip_dwarf(&object) {
        println!(
            "cargo::error=stripping the DWARF from {}: {err}",
            object.display()
        );
    }
}

/// Rewrites the ELF object at `path` without its `.debug_*` sections and
/// their relocation sections. Programs, maps, `.BTF` and `.BTF.ext` stay as
/// they are.
fn strip_dwarf(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let data = std::fs::read(path)?;
    let mut builder = object::build::elf::Builder::read(&*data)?;
    let mut debug = Vec::new();
    for section in builder.sections.iter_mut() {
        if section.name.as_slice().starts_with(b".debug_") {
            section.delete = true;
            debug.push(section.id());
        }
    }
    // A relocation section whose target went too (`sh_info`).
    for section in builder.sections.iter_mut() {
        if section
            .sh_info_section
            .is_some_and(|target| debug.contains(&target))
        {
            section.delete = true;
        }
    }
    builder.delete_orphans();
    // bpf-linker keeps section names in `.strtab` with the symbols' names;
    // the writer wants a section-name table of its own.
    let has_section_names = builder
        .sections
        .iter()
        .any(|s| !s.delete && matches!(s.data, object::build::elf::SectionData::SectionString));
    if !has_section_names {
        let names = builder.sections.add();
        names.name = b".shstrtab"[..].into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = object::build::elf::SectionData::SectionString;
    }
    let mut out = Vec::new();
    builder.write(&mut out)?;
    std::fs::write(path, out)?;
    Ok(())
}

/// Release builds lay out first, together, the daemon's functions listed in
/// `code-layout.txt` (lld's symbol ordering file): the code that ran in a
/// profile (`cargo xtask code-layout`). The kernel maps a program's code in
/// 64 KiB windows around each page that runs, so code that runs spread
/// over the whole file makes most of the file resident. Names the build no
/// longer has are skipped; a stale list costs memory, never correctness.
/// Only where rustc links with its own lld by default (x86-64 Linux, Rust
/// 1.90 on): GNU ld has no such option.
fn code_layout() {
    let list = concat!(env!("CARGO_MANIFEST_DIR"), "/code-layout.txt");
    println!("cargo::rerun-if-changed={list}");
    let release = env::var("PROFILE").as_deref() == Ok("release");
    let lld = env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    if release && lld && std::path::Path::new(list).exists() {
        println!("cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={list}");
        println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
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
