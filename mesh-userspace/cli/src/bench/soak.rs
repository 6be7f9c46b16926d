//! `lacewing bench soak` (run by `cargo xtask soak --minutes N`): mixed
//! traffic through a 2-node lab for N minutes, while the mesh changes
//! under it, sampling what each process holds.
//!
//! ```text
//!   n0-p0 client ── churn.py 20/s ──> echo  10.96.5.1:80 -> n1-p0, n1-p1 :9000 (L4, tunnel)
//!                ── churn.py 10/s ──> local 10.96.5.2:80 -> n0-p1 :9000       (same node)
//!                ── h2load 10/s ────> web   10.96.5.3:80 (HTTPRoute: 50/50 to
//!                                     web-v1 n1-p0, web-v2 n1-p1 :8080, retries)
//! ```
//!
//! Meanwhile a Service is added or removed every 5 s, node and workload
//! certificates live 20 s (renewed every 10 s), and n1's daemon is upgraded
//! once, 30 s in. After a warm-up (a minute, or a fifth of the run if
//! longer) the node daemons' and the controller's RSS and open files and
//! each node's sockhash entries are sampled every minute (every 20 s in
//! runs under 10 minutes). The soak fails when any request fails or when a
//! series ends higher than it started after warm-up by more than its
//! tolerance (RSS: 4 MiB or 20 %, whichever is more; files and sockhash
//! entries: 32).

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{keep_logs_on_error, node_metric};
use crate::lab::{Lab, LabProcess, PodSpec};

#[derive(Clone, Debug)]
pub struct Options {
    pub minutes: u32,
}

/// One look at every process and node.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the load started.
    pub at_s: u64,
    /// (name, RSS in KiB, open files) of n0's daemon, n1's, the controller.
    pub processes: Vec<(String, u64, usize)>,
    /// Sockhash entries (both splice maps) on n0 and n1.
    pub sockhash: Vec<(String, usize)>,
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub minutes: u32,
    pub requests: u64,
    pub failed: u64,
    pub config_changes: u32,
    pub renewals: f64,
    pub samples: Vec<Sample>,
    /// Series that grew past their tolerance after warm-up.
    pub growing: Vec<String>,
}

const ECHO_PORT: u16 = 9000;
const HTTP_PORT: u16 = 8080;
const ECHO_VIP: &str = "10.96.5.1";
const LOCAL_VIP: &str = "10.96.5.2";
const WEB_VIP: &str = "10.96.5.3";
const CERT_TTL: &str = "20s";

pub fn run(bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        opts.minutes >= 2,
        "a soak needs at least 2 minutes (warm-up is one)"
    );
    let lab = Lab::new(2, 2)?;
    let result = soak(&lab, bin_dir, opts);
    keep_logs_on_error(&lab, result)
}

fn soak(lab: &Lab, bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let total = Duration::from_secs(u64::from(opts.minutes) * 60);
    let warm_up = Duration::from_secs(60).max(total / 5);
    let every = if opts.minutes < 10 {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(60)
    };
    let pods = ["n0-p0", "n0-p1", "n1-p0", "n1-p1"]
        .map(|p| lab.pod(p))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let [client, local, web0, web1] = [&pods[0], &pods[1], &pods[2], &pods[3]];
    // Node certificates as short as the workloads': each daemon renews its
    // own every 10 s too.
    let ca = lacewing_core::pki::Ca::load_or_create(&lab.pki_dir().join("ca"))?;
    for node in lab.topology().nodes() {
        ca.issue_node_for(
            &lab.pki_dir().join("nodes").join(node.name()),
            lacewing_core::pki::DEFAULT_TRUST_DOMAIN,
            &node.name(),
            Duration::from_secs(20),
        )?;
    }
    let own = vec!["--drain-timeout".to_owned(), "10m".to_owned()];
    let mut mesh = lab.start_mesh_full(
        bin_dir,
        &["--node-cert-ttl", CERT_TTL, "--workload-cert-ttl", CERT_TTL],
        &|_| own.clone(),
    )?;
    std::fs::write(
        mesh.folder.join("soak.yaml"),
        config_yaml(client, local, web0, web1),
    )?;
    super::tunnel::wait_for_certificates(lab, &["n0", "n1"])?;
    let mut servers: Vec<LabProcess> = Vec::new();
    for pod in [local, web0, web1] {
        let mut cmd = Command::new("python3");
        cmd.arg(super::tool("xfer.py")?)
            .args(["serve", &ECHO_PORT.to_string()]);
        let mut echo = lab.spawn_in_pod(pod, cmd)?;
        echo.wait_listening(ECHO_PORT, Duration::from_secs(10))?;
        servers.push(echo);
    }
    for (pod, body) in [(web0, "v1"), (web1, "v2")] {
        servers.push(lab.start_http_server(pod, HTTP_PORT, body)?);
    }
    wait_for_route(lab)?;

    let seconds = total.as_secs().to_string();
    let churn = |vip: &str, rate: &str| -> anyhow::Result<LabProcess> {
        let mut cmd = Command::new("python3");
        cmd.arg(super::tool("churn.py")?)
            .args([vip, "80", rate, &seconds])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        Ok(lab.spawn_in_pod(client, cmd)?)
    };
    let across = churn(ECHO_VIP, "20")?;
    let same_node = churn(LOCAL_VIP, "10")?;
    let h2load = {
        let mut cmd = Command::new("h2load");
        cmd.args(["--h1", "-c", "2", "--rps=5", "-D", &seconds])
            .arg(format!("http://{WEB_VIP}/"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        lab.spawn_in_pod(client, cmd).context("starting h2load")?
    };
    eprintln!(
        "soak for {} min: warm-up {} s, a sample every {} s",
        opts.minutes,
        warm_up.as_secs(),
        every.as_secs()
    );

    let started = Instant::now();
    let mut next_change = Duration::from_secs(5);
    let mut next_sample = warm_up;
    let mut upgraded: Option<LabProcess> = None;
    let mut changes = 0u32;
    let mut samples = Vec::new();
    while started.elapsed() < total {
        let now = started.elapsed();
        if upgraded.is_none() && now >= Duration::from_secs(30) {
            let n1 = lab.node("n1")?;
            let log = lab.state_dir().join("logs").join("n1-upgraded.log");
            let new = lab.upgrade_mesh_node(&n1, bin_dir, &own, &log)?;
            upgraded = Some(std::mem::replace(&mut mesh.nodes[1], new));
            eprintln!("n1's daemon upgraded at {} s", now.as_secs());
        }
        if now >= next_change {
            changes += 1;
            let extra = mesh.folder.join("extra.yaml");
            if changes % 2 == 1 {
                std::fs::write(&extra, extra_service(changes))?;
            } else {
                std::fs::remove_file(&extra)?;
            }
            next_change += Duration::from_secs(5);
        }
        if now >= next_sample {
            let s = sample(lab, &mesh, now.as_secs())?;
            eprintln!("{}", sample_line(&s));
            samples.push(s);
            next_sample += every;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The last look, with the load just over.
    samples.push(sample(lab, &mesh, started.elapsed().as_secs())?);

    let mut requests = 0;
    let mut failed = 0;
    for (what, churn) in [("across nodes", across), ("on one node", same_node)] {
        let out = churn.wait_with_output().context("running churn.py")?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        anyhow::ensure!(out.status.success(), "churn.py {what} failed: {text}");
        let (n, ok) = churn_counts(&text)?;
        eprintln!("new connections {what}: {text}");
        requests += n;
        failed += n - ok;
    }
    let out = h2load.wait_with_output().context("running h2load")?;
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "h2load failed: {summary}");
    let (n, ok) = h2load_counts(&summary)?;
    eprintln!("routed requests: {n} started, {ok} answered 2xx");
    requests += n;
    failed += n - ok;
    // The load went where it was meant to: through the tunnel into n1's
    // current daemon, and through the router on n0.
    for (node, metric) in [
        (
            "n1",
            "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}",
        ),
        ("n0", "lacewing_requests_total"),
    ] {
        anyhow::ensure!(
            node_metric(lab, node, metric)? > 0.0,
            "{node}'s {metric} did not move: the load did not take the path it names"
        );
    }
    let renewals = node_metric(
        lab,
        "n0",
        "lacewing_node_certificate_renewals_total{result=\"ok\"}",
    )?;
    drop(upgraded);
    drop(servers);
    let growing = growing(&samples);
    Ok(Outcome {
        minutes: opts.minutes,
        requests,
        failed,
        config_changes: changes,
        renewals,
        samples,
        growing,
    })
}

/// A Service that comes and goes (a config change on every node).
fn extra_service(n: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: extra-{n}, namespace: soak}}\nspec: {{clusterIP: 10.96.5.{}, ports: [{{name: tcp, port: 80}}]}}\n",
        100 + n % 100
    )
}

fn config_yaml(client: &PodSpec, local: &PodSpec, web0: &PodSpec, web1: &PodSpec) -> String {
    let mut docs = vec![
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: soak, labels: {lacewing.io/mesh: enabled}}\n".to_owned(),
    ];
    for (name, node, pod) in [
        ("client", "n0", client),
        ("local", "n0", local),
        ("web-0", "n1", web0),
        ("web-1", "n1", web1),
    ] {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: soak}}\nspec: {{nodeName: {node}}}\nstatus: {{phase: Running, podIP: \"{}\"}}\n",
            pod.ip4()
        ));
    }
    let service = |name: &str, vip: &str, port: u16, app: &str, to: &[&PodSpec]| {
        let addresses: Vec<String> = to.iter().map(|p| format!("\"{}\"", p.ip4())).collect();
        let app = if app.is_empty() {
            String::new()
        } else {
            format!(", appProtocol: {app}")
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: soak}}\nspec: {{clusterIP: {vip}, ports: [{{name: p, port: 80, targetPort: {port}{app}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: soak, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: {port}, protocol: TCP}}]\nendpoints: [{{addresses: [{}]}}]\n",
            addresses.join(", ")
        )
    };
    docs.push(service("echo", ECHO_VIP, ECHO_PORT, "", &[web0, web1]));
    docs.push(service("local", LOCAL_VIP, ECHO_PORT, "", &[local]));
    docs.push(service("web", WEB_VIP, HTTP_PORT, "http", &[web0, web1]));
    docs.push(service("web-v1", "10.96.5.4", HTTP_PORT, "http", &[web0]));
    docs.push(service("web-v2", "10.96.5.5", HTTP_PORT, "http", &[web1]));
    docs.push(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: soak}\nspec:\n  parentRefs: [{kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs: [{name: web-v1, port: 80, weight: 50}, {name: web-v2, port: 80, weight: 50}]\n    retry: {attempts: 2, codes: [502, 503]}\n".to_owned(),
    );
    docs.join("---\n")
}

/// Until n0 routes the web Service.
fn wait_for_route(lab: &Lab) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let routes = lab
            .node_get(&lab.node("n0")?, "/routes")
            .unwrap_or_default();
        if routes.contains(WEB_VIP) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("n0 did not take the web route in 15 s: {routes}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sample(lab: &Lab, mesh: &crate::lab::Mesh, at_s: u64) -> anyhow::Result<Sample> {
    let mut processes = Vec::new();
    for (name, p) in [
        ("n0", &mesh.nodes[0]),
        ("n1", &mesh.nodes[1]),
        ("controller", &mesh.controller),
    ] {
        let pid = p.pid();
        let rss_kb = (super::tunnel::rss_mb(pid)? * 1024.0) as u64;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("the open files of {name} (pid {pid})"))?
            .count();
        processes.push((name.to_owned(), rss_kb, fds));
    }
    let mut sockhash = Vec::new();
    for node in ["n0", "n1"] {
        let mut entries = 0;
        for map in [
            mesh_common::names::MAP_SPLICE,
            mesh_common::names::MAP_SPLICE_TO,
        ] {
            let pin = lab.node_bpffs_root(&lab.node(node)?).join("maps").join(map);
            let out = Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(&pin)
                .output()
                .context("running bpftool")?;
            anyhow::ensure!(
                out.status.success(),
                "bpftool map dump {}: {}",
                pin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let dump: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            entries += dump.as_array().map_or(0, Vec::len);
        }
        sockhash.push((node.to_owned(), entries));
    }
    Ok(Sample {
        at_s,
        processes,
        sockhash,
    })
}

pub fn sample_line(s: &Sample) -> String {
    let mut line = format!("SAMPLE t={}s", s.at_s);
    for (name, rss, fds) in &s.processes {
        let _ = write!(
            line,
            " {name}_rss_mb={:.1} {name}_fds={fds}",
            *rss as f64 / 1024.0
        );
    }
    for (node, n) in &s.sockhash {
        let _ = write!(line, " {node}_sockhash={n}");
    }
    line
}

/// The series that ended higher than they started (after warm-up) by more
/// than their tolerance, each with its first and last value.
fn growing(samples: &[Sample]) -> Vec<String> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return vec!["no samples".to_owned()];
    };
    let mut out = Vec::new();
    for ((name, rss0, fds0), (_, rss1, fds1)) in first.processes.iter().zip(&last.processes) {
        let tolerance = (4 * 1024).max(rss0 / 5);
        if *rss1 > rss0 + tolerance {
            out.push(format!("{name} RSS {rss0} KiB -> {rss1} KiB"));
        }
        if *fds1 > fds0 + 32 {
            out.push(format!("{name} open files {fds0} -> {fds1}"));
        }
    }
    for ((node, n0), (_, n1)) in first.sockhash.iter().zip(&last.sockhash) {
        if *n1 > n0 + 32 {
            out.push(format!("{node} sockhash entries {n0} -> {n1}"));
        }
    }
    out
}

/// (requests, ok) from churn.py's line.
fn churn_counts(line: &str) -> anyhow::Result<(u64, u64)> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok())
            .with_context(|| format!("no {name} in churn.py's line `{line}`"))
    };
    Ok((field("requests")?, field("ok")?))
}

/// (started, answered 2xx) from h2load's summary.
fn h2load_counts(summary: &str) -> anyhow::Result<(u64, u64)> {
    let number_after = |prefix: &str| {
        summary
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .with_context(|| format!("no `{prefix}` in h2load's summary: {summary}"))
    };
    Ok((number_after("requests:")?, number_after("status codes:")?))
}

pub fn result_line(o: &Outcome) -> String {
    let first = o.samples.first();
    let last = o.samples.last();
    let mut line = format!(
        "RESULT soak minutes={} requests={} failed={} config_changes={} n0_renewals={} samples={}",
        o.minutes,
        o.requests,
        o.failed,
        o.config_changes,
        o.renewals,
        o.samples.len()
    );
    if let (Some(a), Some(b)) = (first, last) {
        for ((name, rss0, fds0), (_, rss1, fds1)) in a.processes.iter().zip(&b.processes) {
            let _ = write!(
                line,
                " {name}_rss_mb={:.1}->{:.1} {name}_fds={fds0}->{fds1}",
                *rss0 as f64 / 1024.0,
                *rss1 as f64 / 1024.0
            );
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rss: u64, fds: usize, socks: usize) -> Sample {
        Sample {
            at_s: 0,
            processes: vec![("n0".into(), rss, fds)],
            sockhash: vec![("n0".into(), socks)],
        }
    }

    #[test]
    fn a_series_that_ends_past_its_tolerance_is_growing() {
        assert!(growing(&[s(20_000, 40, 2), s(23_000, 60, 30)]).is_empty());
        assert_eq!(
            growing(&[s(20_000, 40, 2), s(30_000, 80, 40)]),
            [
                "n0 RSS 20000 KiB -> 30000 KiB",
                "n0 open files 40 -> 80",
                "n0 sockhash entries 2 -> 40"
            ]
        );
        assert_eq!(growing(&[]), ["no samples"]);
    }

    #[test]
    fn load_summaries_are_read_and_a_missing_count_is_an_error() {
        assert_eq!(
            churn_counts("requests=800 ok=799 refused=0 resets=1 closed=0 timeouts=0 other=0")
                .unwrap(),
            (800, 799)
        );
        assert!(churn_counts("garbage").is_err());
        let h2load = "finished in 60.00s, 5.00 req/s, 1KB/s\nrequests: 300 total, 300 started, 300 done, 300 succeeded, 0 failed, 0 errored, 0 timeout\nstatus codes: 300 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        assert_eq!(h2load_counts(h2load).unwrap(), (300, 300));
        assert!(h2load_counts("finished").is_err());
    }
}
