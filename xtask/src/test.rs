//! `cargo xtask test`: what CI runs. Setup, formatting, lints, unit tests, then
//! the lab tests as root with the real kernel programs. It fails when the lab
//! tests did not run, were skipped, or left lab resources behind.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{layers, run, setup};

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    run::cmd("cargo", ["fmt", "--all", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;
    run::cmd("cargo", ["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // The kernel crate only builds for the BPF target, with the nightly.
    run::cmd(
        "rustup",
        [
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "mesh-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    layers::check()?;
    // Every host crate's unit tests: all default members but the lab tests.
    run::cmd(
        "cargo",
        [
            "test",
            "--workspace",
            "--exclude",
            "lacewing-tests",
            "--exclude",
            "mesh-ebpf",
            "--no-fail-fast",
        ],
    )?;

    run::build_binaries(false)?;
    for dir in run::CRD_DIRS {
        run::cmd(
            run::workspace_root().join("target/debug/lacewing"),
            ["manifests", "--check", "--out", dir],
        )
        .with_context(|| {
            format!("{dir} is stale: run `cargo xtask manifests` and commit the result")
        })?;
    }
    let mut validate = Command::new("python3");
    validate
        .args(["-m", "kubernetes_validate", "-k", KUBERNETES_VERSION])
        .current_dir(run::workspace_root());
    validate.args(crd_files()?);
    run::status(validate).context("the CRDs are not valid Kubernetes objects")?;
    check_chart()?;
    run::require_root("the lab tests")?;
    let before = lab_resources();
    let summary = lab_tests()?;
    let leaked: Vec<String> = lab_resources().difference(&before).cloned().collect();
    if !leaked.is_empty() {
        bail!(
            "the lab tests left resources behind: {}; find the test that leaks them",
            leaked.join(", ")
        );
    }
    if summary.passed == 0 {
        bail!("no lab test ran: the lab tests must run (as root) in CI");
    }
    if summary.ignored > 0 || summary.failed > 0 {
        bail!(
            "lab tests: {} failed, {} ignored; every lab test must run and pass",
            summary.failed,
            summary.ignored
        );
    }
    eprintln!(
        "xtask test: all checks passed; lab tests run: {} (in {:.0} s total)",
        summary.passed,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The Kubernetes version the manifests are checked against.
const KUBERNETES_VERSION: &str = "1.33.0";

/// `helm lint`, then every manifest the chart renders (with capture off and
/// on) checked against Kubernetes' schemas.
fn check_chart() -> anyhow::Result<()> {
    let helm = setup::helm_path();
    let root = run::workspace_root();
    let mut lint = Command::new(&helm);
    lint.args(["lint", run::CHART]).current_dir(&root);
    run::status(lint).context("helm lint failed")?;
    for (name, extra) in [
        ("chart.yaml", &[][..]),
        (
            "chart-capture.yaml",
            &["--set", "node.podNetnsDir=/run/lacewing/netns"][..],
        ),
    ] {
        let out = Command::new(&helm)
            .args([
                "template",
                "lacewing",
                run::CHART,
                "--namespace",
                "lacewing-system",
            ])
            .args(extra)
            .current_dir(&root)
            .output()
            .context("running helm template")?;
        anyhow::ensure!(
            out.status.success(),
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = root.join("target").join(name);
        fs::write(&file, &out.stdout)?;
        let mut validate = Command::new("python3");
        validate
            .args(["-m", "kubernetes_validate", "-k", KUBERNETES_VERSION])
            .arg(&file);
        run::status(validate).context("the chart renders objects Kubernetes would reject")?;
    }
    Ok(())
}

fn crd_files() -> anyhow::Result<Vec<String>> {
    let dir = run::workspace_root().join("deploy/crds");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| format!("deploy/crds/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    Ok(files)
}

#[derive(Debug, Default, PartialEq)]
struct Summary {
    passed: u32,
    failed: u32,
    ignored: u32,
}

/// Runs the end-to-end crate (every test, even after a failure), echoing
/// its output and adding up its `test result:` lines; fails when a lab test
/// in the tree did not run and pass.
fn lab_tests() -> anyhow::Result<Summary> {
    let expected = lab_tests_in_tree()?;
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--package", "lacewing-tests", "--no-fail-fast"])
        .current_dir(run::workspace_root())
        .stdout(Stdio::piped());
    eprintln!("xtask: $ {}", run::show(&cmd));
    let mut child = cmd.spawn().context("could not start cargo test")?;
    let mut summary = Summary::default();
    let mut passed = BTreeSet::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(s) = parse_result(&line) {
            summary.passed += s.passed;
            summary.failed += s.failed;
            summary.ignored += s.ignored;
        }
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... ok"))
        {
            passed.insert(name.to_owned());
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("lab tests failed ({status}); see the output above");
    }
    let missing: Vec<&String> = expected.difference(&passed).collect();
    if !missing.is_empty() {
        bail!(
            "lab tests in tests/tests/ that did not run and pass: {missing:?} (a test that silently disappears fails CI)"
        );
    }
    eprintln!(
        "xtask: all {} lab tests in the tree ran and passed",
        expected.len()
    );
    Ok(summary)
}

/// The `#[test]` functions of `tests/tests/*.rs`.
fn lab_tests_in_tree() -> anyhow::Result<BTreeSet<String>> {
    let dir = run::workspace_root().join("tests/tests");
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            names.extend(test_functions(&fs::read_to_string(&path)?));
        }
    }
    anyhow::ensure!(!names.is_empty(), "no lab test found in {}", dir.display());
    Ok(names)
}

/// Names of the functions marked `#[test]` in a source file.
fn test_functions(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut marked = false;
    for line in source.lines().map(str::trim) {
        if line == "#[test]" {
            marked = true;
        } else if marked && let Some(rest) = line.strip_prefix("fn ") {
            names.extend(rest.split('(').next().map(str::to_owned));
            marked = false;
        } else if marked && !line.starts_with("#[") {
            marked = false;
        }
    }
    names
}

/// `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`
fn parse_result(line: &str) -> Option<Summary> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |what: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(what)
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    Some(Summary {
        passed: count(" passed"),
        failed: count(" failed"),
        ignored: count(" ignored"),
    })
}

/// Names of lab resources (prefix `lw-`) on the machine: namespaces, cgroups
/// below the cgroup v2 root, and bpffs folders.
fn lab_resources() -> BTreeSet<String> {
    let mut dirs = vec!["/run/netns".to_owned(), "/sys/fs/bpf".to_owned()];
    if let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") {
        dirs.extend(mountinfo.lines().filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        }));
    }
    dirs.iter()
        .flat_map(|d| fs::read_dir(Path::new(d)).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with("lw-")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_test_functions_of_a_file() {
        let source =
            "#[test]\nfn one() {}\n\nfn helper() {}\n#[test]\n#[should_panic]\nfn two() {}\n";
        assert_eq!(test_functions(source), ["one", "two"]);
    }

    #[test]
    fn adds_up_libtest_results() {
        let ok = "test result: ok. 7 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 3.21s";
        assert_eq!(
            parse_result(ok),
            Some(Summary {
                passed: 7,
                failed: 0,
                ignored: 2
            })
        );
        let bad = "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(
            parse_result(bad),
            Some(Summary {
                passed: 3,
                failed: 1,
                ignored: 0
            })
        );
        assert_eq!(parse_result("running 7 tests"), None);
    }
}
