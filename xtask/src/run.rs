//! Running commands, with messages that name the command that failed.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask's parent folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root with inherited output; fails on a
/// non-zero exit.
pub fn cmd<S: AsRef<OsStr>>(
    program: impl AsRef<OsStr>,
    args: impl IntoIterator<Item = S>,
) -> anyhow::Result<()> {
    let mut c = Command::new(program);
    c.args(args).current_dir(workspace_root());
    status(c)
}

/// Runs a prepared command; fails on a non-zero exit, naming the command.
pub fn status(mut c: Command) -> anyhow::Result<()> {
    let shown = show(&c);
    eprintln!("xtask: $ {shown}");
    let st = c
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !st.success() {
        bail!("`{shown}` failed ({st})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout if it succeeded.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn show(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The crates of the binaries.
pub const BINARY_PACKAGES: [&str; 4] = [
    "lacewing-node",
    "lacewing-controller",
    "lacewing-cni",
    "lacewing",
];

/// Builds the binaries.
pub fn build_binaries(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build"];
    for package in BINARY_PACKAGES {
        args.extend(["--package", package]);
    }
    args.push("--bins");
    if release {
        args.push("--release");
    }
    cmd("cargo", args)
}

pub fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|uid| uid.trim() == "0")
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (network namespaces, cgroups, BPF): run it as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

/// Where `cargo xtask manifests` writes the CRDs: the plain folder and the
/// Helm chart's (Helm installs `crds/` before the templates).
pub const CRD_DIRS: [&str; 2] = ["deploy/crds", "deploy/chart/lacewing/crds"];

/// The Helm chart.
pub const CHART: &str = "deploy/chart/lacewing";
