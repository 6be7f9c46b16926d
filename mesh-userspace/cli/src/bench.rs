//! Benchmarks that run in the lab (`cargo xtask bench ...`). Each measures
//! Lacewing against baselines in the same run and prints ratios, ending with
//! one `RESULT` line.

pub mod control_plane;
pub mod l4;
pub mod l7;
pub mod local;
pub mod soak;
pub mod tunnel;
pub mod upgrade;
pub mod wrk;

use anyhow::Context as _;

use crate::lab::Lab;

/// A tool of the lab tests (`tests/tools/<name>`), which benchmarks run
/// from the workspace they were built in.
pub(crate) fn tool(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/tools")
        .join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found: run the benchmark from the workspace (`cargo xtask bench ...`, `cargo xtask soak`)",
        path.display()
    );
    Ok(path)
}

/// The sum of `node`'s metric lines (on :15020) that start with
/// `line_start`; an error when the metrics cannot be read, so a benchmark
/// never mistakes a failed read for a zero.
pub(crate) fn node_metric(lab: &Lab, node: &str, line_start: &str) -> anyhow::Result<f64> {
    let text = lab
        .node_get(&lab.node(node)?, "/metrics")
        .with_context(|| format!("reading {node}'s metrics"))?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// `result`, but on an error first copies the lab's daemon logs to
/// `target/bench-logs/<lab>` (the lab and its files go when it is dropped)
/// and says where they are.
pub(crate) fn keep_logs_on_error<T>(lab: &Lab, result: anyhow::Result<T>) -> anyhow::Result<T> {
    let Err(err) = result else {
        return result;
    };
    let from = lab.state_dir().join("logs");
    let to = std::path::Path::new("target/bench-logs").join(lab.id().prefix());
    let copied = std::fs::create_dir_all(&to).and_then(|()| {
        for entry in std::fs::read_dir(&from)? {
            let entry = entry?;
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
        Ok(())
    });
    match copied {
        Ok(()) => Err(err.context(format!("the daemons' logs are in {}", to.display()))),
        Err(copy) => Err(err.context(format!("(their logs could not be kept: {copy})"))),
    }
}

/// Runs `measure` and checks that the counter `line_start` on `node` moved
/// by at least `at_least` (or, with 0, did not move at all): the benchmark
/// measured the path it names.
pub(crate) fn on_path<T>(
    lab: &Lab,
    node: &str,
    line_start: &str,
    at_least: f64,
    what: &str,
    measure: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let before = node_metric(lab, node, line_start)?;
    let out = measure()?;
    let moved = node_metric(lab, node, line_start)? - before;
    let ok = if at_least == 0.0 {
        moved == 0.0
    } else {
        moved >= at_least
    };
    anyhow::ensure!(
        ok,
        "{what}: {line_start} on {node} moved by {moved}, expected {}: the run did not take the path it names",
        if at_least == 0.0 {
            "0".to_owned()
        } else {
            format!("at least {at_least}")
        }
    );
    Ok(out)
}
