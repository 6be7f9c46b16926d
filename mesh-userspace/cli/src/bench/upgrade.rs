//! `lacewing bench upgrade`: node daemons upgraded under load. A meshed
//! client on n0 sends HTTP/1.1 keep-alive requests to nginx on n1 at a
//! fixed rate (h2load, 4 connections, 100 requests/s) and opens a new
//! connection for each of 200 requests a second to an echo server there
//! (tests/tools/churn.py); meanwhile each node's daemon is upgraded every
//! `interval` (the two nodes in turn). Every request is logged with its
//! start and latency: failures and resets are counted, and the p99 latency
//! of requests that started in a window around an upgrade (from its start
//! to a second after the takeover) is compared with the p99 of the others.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;

use super::{keep_logs_on_error, node_metric};
use crate::lab::{Lab, LabProcess};

#[derive(Clone, Debug)]
pub struct Options {
    /// How long the load runs.
    pub seconds: u32,
    /// How often each node's daemon is upgraded.
    pub interval: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub upgrades: usize,
    pub requests: usize,
    pub failed: usize,
    pub resets: usize,
    pub p99_during_us: f64,
    pub p99_steady_us: f64,
    /// How long each takeover took, from the new daemon's start.
    pub takeover_ms: Vec<f64>,
}

const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
/// Streams through the last n1 daemon: the load went through the mesh.
const STREAMS_IN: &str = "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}";

/// One request: when it started (seconds since the epoch), its latency in
/// microseconds, and whether it succeeded (and if not, whether it was a
/// reset).
struct Request {
    at: f64,
    latency_us: f64,
    ok: bool,
    reset: bool,
}

pub fn run(bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let lab = Lab::new(2, 1)?;
    let result = measure(&lab, bin_dir, opts);
    keep_logs_on_error(&lab, result)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn measure(lab: &Lab, bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let (client, server) = (lab.pod("n0-p0")?, lab.pod("n1-p0")?);
    // Connections longer than the run are never cut by a drain timeout.
    let own = vec!["--drain-timeout".to_owned(), "10m".to_owned()];
    let mut mesh = lab.start_mesh_with(bin_dir, &|_| own.clone())?;
    std::fs::write(
        mesh.folder.join("bench.yaml"),
        super::tunnel::pods_yaml(true, (&client, "n0"), (&server, "n1")),
    )?;
    super::tunnel::wait_for_certificates(lab, &["n0", "n1"])?;
    let _nginx = lab.start_http_server(&server, HTTP_PORT, "upgrade")?;
    let mut echo = {
        let mut cmd = Command::new("python3");
        cmd.arg(super::tool("xfer.py")?)
            .args(["serve", &ECHO_PORT.to_string()]);
        lab.spawn_in_pod(&server, cmd)?
    };
    echo.wait_listening(ECHO_PORT, Duration::from_secs(10))?;
    let target = server.ip4().to_string();
    let h2load_log = lab.state_dir().join("h2load-upgrade.log");
    let churn_log = lab.state_dir().join("churn-upgrade.csv");
    let seconds = opts.seconds.to_string();
    let h2load = {
        let mut cmd = Command::new("h2load");
        cmd.args(["--h1", "-c", "4", "--rps=25", "-D", &seconds])
            .arg(format!("--log-file={}", h2load_log.display()))
            .arg(format!("http://{target}:{HTTP_PORT}/"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        lab.spawn_in_pod(&client, cmd).context("starting h2load")?
    };
    let churn = {
        let mut cmd = Command::new("python3");
        cmd.arg(super::tool("churn.py")?)
            .args([target.as_str(), &ECHO_PORT.to_string(), "200", &seconds])
            .arg(&churn_log)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        lab.spawn_in_pod(&client, cmd)
            .context("starting churn.py")?
    };
    eprintln!(
        "load for {} s; each node's daemon upgraded every {} s",
        opts.seconds, opts.interval
    );
    let started = Instant::now();
    let mut windows: Vec<(f64, f64)> = Vec::new();
    let mut old: Vec<LabProcess> = Vec::new();
    let mut takeover_ms = Vec::new();
    let half = Duration::from_secs_f64(f64::from(opts.interval) / 2.0);
    let mut due = half;
    let mut turn = 0usize;
    // The last upgrade ends a few seconds before the load does.
    while due + Duration::from_secs(3) < Duration::from_secs(u64::from(opts.seconds)) {
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let index = turn % 2;
        let node = lab.topology().nodes().nth(index).context("a node")?;
        let log = lab
            .state_dir()
            .join("logs")
            .join(format!("{}-{turn}.log", node.name()));
        let from = now();
        let t0 = Instant::now();
        let new = lab.upgrade_mesh_node(&node, bin_dir, &own, &log)?;
        takeover_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        windows.push((from, now() + 1.0));
        old.push(std::mem::replace(&mut mesh.nodes[index], new));
        turn += 1;
        due += half;
    }
    let h2load = h2load.wait_with_output().context("running h2load")?;
    anyhow::ensure!(
        h2load.status.success(),
        "h2load failed: {}",
        String::from_utf8_lossy(&h2load.stderr)
    );
    let churn = churn.wait_with_output().context("running churn.py")?;
    anyhow::ensure!(
        churn.status.success(),
        "churn.py failed: {}",
        String::from_utf8_lossy(&churn.stderr)
    );
    anyhow::ensure!(
        node_metric(lab, "n1", STREAMS_IN)? > 0.0,
        "no tunnel stream reached n1's last daemon: the load did not go through the mesh"
    );
    let mut requests = h2load_requests(&std::fs::read_to_string(&h2load_log)?)?;
    // Requests h2load never got to log (a connection it lost) are failures.
    let summary = String::from_utf8_lossy(&h2load.stdout);
    let issued = h2load_issued(&summary)?;
    let unlogged = issued.saturating_sub(requests.len());
    requests.extend(churn_requests(&std::fs::read_to_string(&churn_log)?)?);
    let expected = f64::from(opts.seconds) * 300.0 * 0.9;
    anyhow::ensure!(
        requests.len() as f64 >= expected,
        "{} requests logged, not about 300 a second: the load did not run",
        requests.len()
    );
    let during = |r: &Request| windows.iter().any(|(a, b)| (*a..*b).contains(&r.at));
    let ok_latency = |pick: &dyn Fn(&Request) -> bool| {
        let mut v: Vec<f64> = requests
            .iter()
            .filter(|r| r.ok && pick(r))
            .map(|r| r.latency_us)
            .collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.99)
    };
    // Old daemons exit by themselves once idle; the lab ends the rest.
    drop(old);
    Ok(Outcome {
        upgrades: windows.len(),
        requests: requests.len() + unlogged,
        failed: requests.iter().filter(|r| !r.ok).count() + unlogged,
        resets: requests.iter().filter(|r| r.reset).count(),
        p99_during_us: ok_latency(&|r| during(r)),
        p99_steady_us: ok_latency(&|r| !during(r)),
        takeover_ms,
    })
}

/// h2load's request log: start (microseconds since the epoch), status,
/// latency (microseconds), tab-separated.
fn h2load_requests(log: &str) -> anyhow::Result<Vec<Request>> {
    log.lines()
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').map(str::trim).collect();
            let parse = |i: usize| -> anyhow::Result<f64> {
                cols.get(i)
                    .and_then(|c| c.parse().ok())
                    .with_context(|| format!("h2load's log line `{line}`"))
            };
            let status = parse(1)?;
            Ok(Request {
                at: parse(0)? / 1e6,
                latency_us: parse(2)?,
                ok: (200.0..300.0).contains(&status),
                reset: false,
            })
        })
        .collect()
}

/// Requests h2load started, from its summary line.
fn h2load_issued(summary: &str) -> anyhow::Result<usize> {
    summary
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
        .with_context(|| format!("no requests line in h2load's summary: {summary}"))
}

/// churn.py's log: start (seconds since the epoch), latency (us), outcome.
fn churn_requests(csv: &str) -> anyhow::Result<Vec<Request>> {
    csv.lines()
        .map(|line| {
            let cols: Vec<&str> = line.split(',').collect();
            let (Some(at), Some(latency), Some(outcome)) = (
                cols.first().and_then(|c| c.parse().ok()),
                cols.get(1).and_then(|c| c.parse().ok()),
                cols.get(2),
            ) else {
                anyhow::bail!("churn.py's log line `{line}`");
            };
            Ok(Request {
                at,
                latency_us: latency,
                ok: *outcome == "ok",
                // A connection the daemon closed before answering counts
                // with the resets: both cut a request off.
                reset: matches!(*outcome, "resets" | "closed"),
            })
        })
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

pub fn result_line(o: &Outcome) -> String {
    format!(
        "RESULT upgrade upgrades={} requests={} failed={} resets={} p99_during_us={:.0} p99_steady_us={:.0}",
        o.upgrades, o.requests, o.failed, o.resets, o.p99_during_us, o.p99_steady_us
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn logs_are_read_into_requests_and_a_bad_line_is_an_error() {
        let h = super::h2load_requests("1764720000000000\t200\t1500\n1764720000100000\t503\t900\n")
            .unwrap();
        assert_eq!(h.len(), 2);
        assert!((h[0].at - 1_764_720_000.0).abs() < 1e-6);
        assert_eq!((h[0].ok, h[1].ok, h[0].latency_us), (true, false, 1500.0));
        let c = super::churn_requests("1764720000.5,800,ok\n1764720000.6,12,resets\n").unwrap();
        assert_eq!((c[0].ok, c[1].ok, c[1].reset), (true, false, true));
        assert!(super::churn_requests("garbage\n").is_err());
        assert_eq!(
            super::h2load_issued("finished in 10s\nrequests: 1000 total, 1000 started").unwrap(),
            1000
        );
    }
}
