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

use anyhow::{Context as _, anyhow, bail};

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

    // Each fuzz target briefly: its seed corpus (every input that once
    // failed) replayed, then 30 s of new inputs.
    crate::fuzz::run(FUZZ_SECONDS, None)?;
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
    check_observability()?;
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
    // A short soak: a leak that shows in minutes fails CI; the long run is
    // by hand (`cargo xtask soak --minutes 30`, docs/benchmarks.md).
    crate::soak::run_built(SOAK_MINUTES, false).context("the soak failed")?;
    let leaked: Vec<String> = lab_resources().difference(&before).cloned().collect();
    if !leaked.is_empty() {
        bail!("the soak left resources behind: {}", leaked.join(", "));
    }
    eprintln!(
        "xtask test: all checks passed; lab tests run: {}, soak of {SOAK_MINUTES} min passed (in {:.0} s total)",
        summary.passed,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// How long CI runs each fuzz target.
const FUZZ_SECONDS: u64 = 30;

/// How long CI soaks the lab.
const SOAK_MINUTES: u32 = 3;

/// The Kubernetes version the manifests are checked against.
const KUBERNETES_VERSION: &str = "1.33.0";

/// `helm lint`, then every manifest the chart renders (with the CNI plugin,
/// without it, and with the netns folder) checked against Kubernetes'
/// schemas, and the CNI plugin's wiring in the default rendering; where the Prometheus Operator's
/// CRDs exist it adds a PodMonitor and a ServiceMonitor, which those schemas
/// do not know, so that rendering is only checked for their presence.
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
        ("chart-no-cni.yaml", &["--set", "cni.enabled=false"][..]),
    ] {
        let rendered = helm_template(&helm, extra)?;
        check_upgrade_strategy(&rendered)?;
        anyhow::ensure!(
            !rendered.contains(MONITORING_API),
            "the chart renders {MONITORING_API} objects in a cluster without the Prometheus Operator's CRDs"
        );
        let file = root.join("target").join(name);
        fs::write(&file, rendered)?;
        let mut validate = Command::new("python3");
        validate
            .args(["-m", "kubernetes_validate", "-k", KUBERNETES_VERSION])
            .arg(&file);
        run::status(validate).context("the chart renders objects Kubernetes would reject")?;
    }
    check_cni(&helm_template(&helm, &[])?)?;
    let rendered = helm_template(&helm, &["--api-versions", MONITORING_API])?;
    for kind in ["kind: PodMonitor", "kind: ServiceMonitor"] {
        anyhow::ensure!(
            rendered.contains(kind),
            "with {MONITORING_API} served, the chart renders no `{kind}` (templates/servicemonitor.yaml)"
        );
    }
    Ok(())
}

/// The node DaemonSet upgrades by handover: a new pod beside the old one
/// (`maxSurge: 1, maxUnavailable: 0`), the handoff socket's run directory
/// on a hostPath both see, readiness from the pod's own ready file (the
/// node's ports answer for whichever daemon accepts), and a grace period
/// longer than the drain.
/// With the CNI plugin (the default): the node pod sees the host's
/// processes (running pods are found in /proc), the daemon serves the
/// plugin's socket, and install-cni writes the host's CNI folders, hostPaths
/// that must exist.
fn check_cni(rendered: &str) -> anyhow::Result<()> {
    let daemonset = node_daemonset(rendered)?;
    let pod = &daemonset["spec"]["template"]["spec"];
    anyhow::ensure!(
        pod["hostPID"] == true,
        "with cni.enabled the node pod needs hostPID: true"
    );
    let containers = pod["containers"]
        .as_sequence()
        .context("the node pod has no containers")?;
    anyhow::ensure!(
        containers[0]["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|a| a.as_str() == Some("--cni-socket=/run/lacewing/cni.sock")),
        "the node daemon is not given --cni-socket"
    );
    let install = containers
        .iter()
        .find(|c| c["name"] == "install-cni")
        .context("with cni.enabled the node pod has no install-cni container")?;
    anyhow::ensure!(
        install["securityContext"]["runAsUser"] == 0,
        "install-cni must run as root"
    );
    for (path, host_type) in [
        ("/host/opt/cni/bin", "Directory"),
        ("/host/etc/cni/net.d", "Directory"),
        ("/run/lacewing", "DirectoryOrCreate"),
    ] {
        let name = install["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == path)
            .and_then(|m| m["name"].as_str())
            .with_context(|| format!("install-cni does not mount {path}"))?;
        let volume = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .with_context(|| format!("volume {name} is missing"))?;
        anyhow::ensure!(
            volume["hostPath"]["type"] == host_type,
            "{path} must be a hostPath of type {host_type}: {volume:?}"
        );
    }
    Ok(())
}

/// The node DaemonSet among the rendered documents.
fn node_daemonset(rendered: &str) -> anyhow::Result<serde_yaml::Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(rendered)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .find(|doc| doc["kind"] == "DaemonSet")
        .context("the chart renders no DaemonSet")
}

fn check_upgrade_strategy(rendered: &str) -> anyhow::Result<()> {
    let daemonset = node_daemonset(rendered)?;
    let spec = &daemonset["spec"];
    let rolling = &spec["updateStrategy"]["rollingUpdate"];
    anyhow::ensure!(
        rolling["maxSurge"] == 1 && rolling["maxUnavailable"] == 0,
        "the node DaemonSet must roll with maxSurge: 1, maxUnavailable: 0 (a new daemon takes over before the old one goes), not {rolling:?}"
    );
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .context("the node container has no args")?
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("the node daemon is not given {name}"))
    };
    let run_dir = flag("--run-dir")?;
    let mounted = container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == run_dir)
        .and_then(|m| m["name"].as_str())
        .context("--run-dir is not a mounted volume")?;
    let volume = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mounted)
        .context("the run directory's volume is missing")?;
    anyhow::ensure!(
        volume["hostPath"]["path"].is_string(),
        "the run directory (the handoff socket) must be a hostPath that the old and the new pod share"
    );
    let ready_file = flag("--ready-file")?;
    let probe = serde_yaml::to_string(&container["readinessProbe"])?;
    anyhow::ensure!(
        probe.contains(ready_file),
        "the readiness probe must check the pod's own ready file {ready_file}, not a shared port: {probe}"
    );
    let drain: u64 = flag("--drain-timeout")?
        .trim_end_matches('s')
        .parse()
        .context("--drain-timeout in seconds")?;
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    anyhow::ensure!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} must be longer than the drain timeout {drain}s"
    );
    Ok(())
}

/// The Prometheus Operator's API, whose presence switches on the chart's
/// scrape objects.
const MONITORING_API: &str = "monitoring.coreos.com/v1";

/// `helm template` of the chart into lacewing-system, with `extra` flags.
fn helm_template(helm: &Path, extra: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(helm)
        .args([
            "template",
            "lacewing",
            run::CHART,
            "--namespace",
            "lacewing-system",
        ])
        .args(extra)
        .current_dir(run::workspace_root())
        .output()
        .context("running helm template")?;
    anyhow::ensure!(
        out.status.success(),
        "helm template {} failed: {}",
        extra.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Prometheus alerting rules, their promtool unit tests, and the Grafana
/// dashboard.
const ALERT_RULES: &str = "deploy/alerts/lacewing-rules.yaml";
const ALERT_TESTS: &str = "deploy/alerts/lacewing-rules.test.yaml";
const DASHBOARD: &str = "deploy/dashboards/lacewing.json";

/// The alerting rules (`promtool check rules`, then their unit tests), and
/// the dashboard: it parses, every panel has a query, and every query is
/// PromQL that Prometheus parses (promtool checks them as recording rules,
/// with the dashboard's variables filled in).
fn check_observability() -> anyhow::Result<()> {
    run::cmd("promtool", ["check", "rules", ALERT_RULES])
        .with_context(|| format!("{ALERT_RULES} is not a valid rules file"))?;
    run::cmd("promtool", ["test", "rules", ALERT_TESTS])
        .with_context(|| format!("the unit tests of the alerting rules failed ({ALERT_TESTS})"))?;
    let root = run::workspace_root();
    let text =
        fs::read_to_string(root.join(DASHBOARD)).with_context(|| format!("reading {DASHBOARD}"))?;
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{DASHBOARD} is not valid JSON"))?;
    let queries = dashboard_queries(&dashboard)
        .map_err(|problems| anyhow!("{DASHBOARD}: {}", problems.join("; ")))?;
    let file = root.join("target/dashboard-queries.yaml");
    fs::write(&file, recording_rules(&queries))?;
    let mut check = Command::new("promtool");
    check.args(["check", "rules"]).arg(&file).current_dir(&root);
    run::status(check).with_context(|| {
        format!(
            "a query of {DASHBOARD} is not valid PromQL: {} names its panel",
            file.display()
        )
    })?;
    eprintln!("xtask: {DASHBOARD}: {} queries parse", queries.len());
    Ok(())
}

/// Every query of a Grafana dashboard as (panel title, expression), rows'
/// nested panels included; or what is wrong: a panel without a query, a
/// query without an expression.
fn dashboard_queries(dashboard: &serde_json::Value) -> Result<Vec<(String, String)>, Vec<String>> {
    fn walk(
        panels: &[serde_json::Value],
        queries: &mut Vec<(String, String)>,
        problems: &mut Vec<String>,
    ) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
            if panel["type"] == "row" {
                walk(
                    panel["panels"].as_array().map_or(&[][..], Vec::as_slice),
                    queries,
                    problems,
                );
                continue;
            }
            let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
            if targets.is_empty() {
                problems.push(format!("panel {title:?} has no query"));
            }
            for target in targets {
                match target["expr"].as_str().map(str::trim) {
                    Some(expr) if !expr.is_empty() => {
                        queries.push((title.clone(), expr.to_owned()))
                    }
                    _ => problems.push(format!(
                        "panel {title:?}: query {} has no expression",
                        target["refId"].as_str().unwrap_or("?")
                    )),
                }
            }
        }
    }
    let mut queries = Vec::new();
    let mut problems = Vec::new();
    match dashboard["panels"].as_array() {
        Some(panels) if !panels.is_empty() => walk(panels, &mut queries, &mut problems),
        _ => problems.push("no panels".to_owned()),
    }
    if problems.is_empty() {
        Ok(queries)
    } else {
        Err(problems)
    }
}

/// A query with Grafana's variables filled in: interval variables become
/// `5m`, any other (`$name`, `${name}`; the dashboard uses them in regex
/// matchers) `.*`.
fn fill_variables(expr: &str) -> String {
    const INTERVALS: [&str; 3] = ["$__rate_interval", "$__interval", "$__range"];
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(interval) = INTERVALS.iter().find(|i| {
            rest.strip_prefix(**i)
                .is_some_and(|after| !after.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
        }) {
            out.push_str("5m");
            rest = &rest[interval.len()..];
        } else if let Some(braced) = rest.strip_prefix("${") {
            out.push_str(".*");
            rest = braced.find('}').map_or("", |end| &braced[end + 1..]);
        } else {
            out.push_str(".*");
            rest = rest[1..].trim_start_matches(|c: char| c.is_alphanumeric() || c == '_');
        }
    }
    out.push_str(rest);
    out
}

/// The queries as a Prometheus rules file of recording rules (a JSON string
/// is a YAML double-quoted scalar).
fn recording_rules(queries: &[(String, String)]) -> String {
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in queries.iter().enumerate() {
        let expr = serde_json::Value::String(fill_variables(expr));
        yaml.push_str(&format!(
            "      # panel {}\n      - record: dashboard_query_{i}\n        expr: {expr}\n",
            title.replace('\n', " ")
        ));
    }
    yaml
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
    let (mut summary, passed) = cargo_test_lab(&[], None)?;
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
    // The daemons run two workers by default; the mesh tests again with
    // one, which must keep working (`--workers 1`, the least memory).
    let (one, passed) = cargo_test_lab(&["--test", "mesh"], Some(("LACEWING_WORKERS", "1")))?;
    anyhow::ensure!(
        one.passed > 0 && passed.iter().any(|t| t.contains("tunnel")),
        "the mesh tests with one worker did not run"
    );
    summary.passed += one.passed;
    summary.failed += one.failed;
    summary.ignored += one.ignored;
    Ok(summary)
}

/// Runs `cargo test -p lacewing-tests` with `args` (and an environment
/// variable), echoing its output; returns its counts and the tests that
/// passed.
fn cargo_test_lab(
    args: &[&str],
    env: Option<(&str, &str)>,
) -> anyhow::Result<(Summary, BTreeSet<String>)> {
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--package", "lacewing-tests", "--no-fail-fast"])
        .args(args)
        .current_dir(run::workspace_root())
        .stdout(Stdio::piped());
    let mut shown = String::new();
    if let Some((k, v)) = env {
        cmd.env(k, v);
        shown = format!("{k}={v} ");
    }
    eprintln!("xtask: $ {shown}{}", run::show(&cmd));
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
    Ok((summary, passed))
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
    const GOOD: &str = "kind: ServiceAccount\n---\nkind: DaemonSet\nspec:\n  updateStrategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}\n  template:\n    spec:\n      terminationGracePeriodSeconds: 45\n      containers:\n        - args: [--drain-timeout=30s, --run-dir=/run/lacewing, --ready-file=/tmp/r]\n          readinessProbe: {exec: {command: [/bin/sh, -c, test -e /tmp/r]}}\n          volumeMounts: [{name: run, mountPath: /run/lacewing}]\n      volumes: [{name: run, hostPath: {path: /run/lacewing}}]\n";

    #[test]
    fn the_upgrade_strategy_check_names_what_is_wrong() {
        super::check_upgrade_strategy(GOOD).unwrap();
        let cases = [
            (
                "maxUnavailable: 0}",
                "maxUnavailable: 1}",
                "maxSurge: 1, maxUnavailable: 0",
            ),
            (
                "hostPath: {path: /run/lacewing}",
                "emptyDir: {}",
                "must be a hostPath",
            ),
            ("test -e /tmp/r", "true", "own ready file"),
            (
                "Seconds: 45",
                "Seconds: 30",
                "longer than the drain timeout 30s",
            ),
        ];
        for (from, to, said) in cases {
            let bad = GOOD.replace(from, to);
            let err = super::check_upgrade_strategy(&bad).unwrap_err().to_string();
            assert!(err.contains(said), "{from} -> {to}: {err}");
        }
    }

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

    #[test]
    fn finds_dashboard_queries_and_panels_without_one() {
        let good = serde_json::json!({"panels": [
            {"type": "row", "title": "r", "panels": [
                {"type": "timeseries", "title": "in a row", "targets": [{"expr": "up"}]}
            ]},
            {"type": "timeseries", "title": "t", "targets": [{"expr": "a"}, {"expr": "b"}]}
        ]});
        assert_eq!(
            dashboard_queries(&good).expect("a dashboard whose panels all have queries"),
            [
                ("in a row".to_owned(), "up".to_owned()),
                ("t".to_owned(), "a".to_owned()),
                ("t".to_owned(), "b".to_owned())
            ]
        );
        let bad = serde_json::json!({"panels": [
            {"type": "stat", "title": "empty"},
            {"type": "timeseries", "title": "blank", "targets": [{"refId": "A", "expr": " "}]}
        ]});
        assert_eq!(
            dashboard_queries(&bad).expect_err("panels without queries must be reported"),
            [
                "panel \"empty\" has no query",
                "panel \"blank\": query A has no expression"
            ]
        );
        assert!(dashboard_queries(&serde_json::json!({})).is_err());
    }

    #[test]
    fn fills_grafana_variables() {
        assert_eq!(
            fill_variables(
                r#"sum(rate(x{a=~"$namespace", b=~"${service}:.*"}[$__rate_interval])) - $__interval_ms_x"#
            ),
            r#"sum(rate(x{a=~".*", b=~".*:.*"}[5m])) - .*"#
        );
        assert_eq!(fill_variables("up"), "up");
    }

    #[test]
    fn dashboard_in_tree_has_a_query_in_every_panel() {
        let path = run::workspace_root().join(DASHBOARD);
        let text = fs::read_to_string(&path).expect("the dashboard file exists");
        let dashboard: serde_json::Value =
            serde_json::from_str(&text).expect("the dashboard is valid JSON");
        assert_eq!(dashboard["schemaVersion"], 39, "Grafana schema version");
        let queries = dashboard_queries(&dashboard).expect("every panel has a query");
        assert!(
            queries
                .iter()
                .all(|(_, expr)| !fill_variables(expr).contains('$')),
            "a query keeps a variable after filling in"
        );
        let rules = recording_rules(&queries);
        assert!(rules.contains("record: dashboard_query_0"), "{rules}");
    }
}
