//! `cargo xtask fuzz [--seconds N] [--target NAME]`: every fuzz target in
//! `mesh-userspace/fuzz` run with cargo-fuzz (libFuzzer, on the nightly
//! toolchain) for N seconds, starting from its seed corpus in the tree.
//!
//! What a run finds goes to a working corpus under `target/`, so the tree's
//! corpus changes only by hand: an input that made a target fail is written
//! under `mesh-userspace/fuzz/artifacts/`, and once the bug is fixed it is
//! added to the target's corpus, where every later run replays it first.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::run;

/// Where the fuzz crate lives (outside the workspace: it builds with the
/// nightly toolchain and libFuzzer's flags).
pub const FUZZ_DIR: &str = "mesh-userspace/fuzz";

/// The targets, from the fuzz crate's `fuzz_targets/*.rs`.
fn targets(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .with_context(|| format!("reading {}/fuzz_targets", dir.display()))?
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    Ok(names)
}

/// The seed corpus of `target` in the tree; a target without one is an
/// error (it would start from nothing on every run).
fn corpus(dir: &Path, target: &str) -> anyhow::Result<PathBuf> {
    let corpus = dir.join("corpus").join(target);
    let seeds = std::fs::read_dir(&corpus).map_or(0, Iterator::count);
    if seeds == 0 {
        bail!(
            "fuzz target `{target}` has no seed corpus: add inputs to {}",
            corpus.display()
        );
    }
    Ok(corpus)
}

fn cargo_fuzz(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"])
        .args(args)
        .current_dir(run::workspace_root());
    c
}

pub fn run(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let root = run::workspace_root();
    let dir = root.join(FUZZ_DIR);
    let mut all = targets(&dir)?;
    if let Some(only) = only {
        if !all.iter().any(|t| t == only) {
            bail!("no fuzz target `{only}`; there are: {}", all.join(", "));
        }
        all.retain(|t| t == only);
    }
    // Safe Rust: no sanitizer (what the targets look for is a panic, an
    // overflow or a hang); debug assertions on, optimized.
    let common = [
        "--fuzz-dir",
        FUZZ_DIR,
        "--sanitizer",
        "none",
        "--debug-assertions",
    ];
    let mut build = cargo_fuzz(&["build"]);
    build.args(common);
    run::status(build).context("building the fuzz targets failed")?;
    for target in &all {
        let seeds = corpus(&dir, target)?;
        let work = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work)?;
        let artifacts = dir.join("artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let mut fuzz = cargo_fuzz(&["run"]);
        fuzz.args(common)
            .arg(target)
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A single input that takes this long is a hang.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        if run::status(fuzz).is_err() {
            bail!(
                "fuzz target `{target}` failed on an input saved in {}: fix the bug, then add the input to {} so it is replayed on every run",
                artifacts.display(),
                seeds.display()
            );
        }
    }
    eprintln!(
        "xtask fuzz: {} targets ({}), {seconds} s each: no failure",
        all.len(),
        all.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_a_seed_corpus_in_the_tree() {
        let dir = run::workspace_root().join(FUZZ_DIR);
        let targets = targets(&dir).unwrap();
        assert_eq!(
            targets,
            [
                "authorization",
                "config_update",
                "hbone_request",
                "http_route",
                "k8s_yaml",
                "maglev"
            ]
        );
        for t in &targets {
            corpus(&dir, t).unwrap();
        }
    }
}
