//! `lacewing bench tunnel`: pod to pod across two lab nodes, the same run
//! measuring with no mesh (the pods' namespace not enrolled) and with
//! Lacewing in STRICT (enrolled): iperf3 throughput (one stream, and four),
//! sockperf request/reply latency under load (`ul`, 5,000 messages/s, one
//! connection) and ping-pong (`pp`), new connections per second (wrk,
//! `Connection: close`, to nginx), the first connection's time (its tunnel
//! to the other node not yet open) and the node daemons' memory and CPU.
//! Each measurement runs `rounds` times; the median is kept.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};

use super::{node_metric, on_path, wrk};
use crate::lab::{Lab, LabProcess, PodSpec};

#[derive(Clone, Debug)]
pub struct Options {
    pub seconds: u32,
    pub rounds: u32,
}

/// One way of running (direct or mesh).
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub gbits: f64,
    pub ul_p50_us: f64,
    pub ul_p99_us: f64,
    pub pp_avg_us: f64,
    /// Ping-pong percentiles (sockperf's pp latency: half the round trip).
    pub pp_p50_us: f64,
    pub pp_p99_us: f64,
}

/// The figures only this benchmark takes (the local one shares [`Figures`]).
#[derive(Clone, Debug, Default)]
pub struct Spread {
    /// iperf3 with four streams.
    pub gbits_4: f64,
    /// New connections per second, one request each.
    pub cps: f64,
    /// One connection and request (curl), the first one to the server.
    pub first_ms: f64,
    /// The same once the first was made (the tunnel to the node pooled).
    pub next_ms: f64,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub direct: Figures,
    pub mesh: Figures,
    pub direct_spread: Spread,
    pub mesh_spread: Spread,
    /// The larger of the two daemons' RSS at the end.
    pub node_rss_mb: f64,
    /// Both daemons' CPU during the mesh's `ul` run, percent of one core.
    pub node_cpu_pct: f64,
}

const IPERF_PORT: u16 = 5201;
/// Tunnel streams the client's node opened, and bytes the server's node
/// delivered: the mesh run's path.
const STREAMS_OUT: &str = "lacewing_tunnel_streams_opened_total{direction=\"outbound\"}";
const BYTES_IN: &str = "lacewing_tunnel_bytes_total{direction=\"inbound\",flow=\"to_destination\"}";
const SOCKPERF_PORT: u16 = 11111;
const HTTP_PORT: u16 = 8080;
/// wrk's connections at a time in the connection-rate run: many clients.
const CPS_CONNECTIONS: u32 = 32;

pub fn run(bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let lab = Lab::new(2, 1)?;
    let (client, server) = (lab.pod("n0-p0")?, lab.pod("n1-p0")?);
    let mesh = lab.start_mesh(bin_dir)?;
    let _servers = start_servers(&lab, &server)?;
    let _nginx = lab.start_http_server(&server, HTTP_PORT, "ok")?;
    let file = mesh.folder.join("bench.yaml");
    std::fs::write(&file, pods_yaml(false, (&client, "n0"), (&server, "n1")))?;
    std::thread::sleep(Duration::from_secs(1));
    eprintln!(
        "measuring with no mesh ({} s each, {} rounds)",
        opts.seconds, opts.rounds
    );
    let direct_spread = on_path(&lab, "n0", STREAMS_OUT, 0.0, "no mesh", || {
        measure_spread(&lab, &client, &server, opts, false)
    })?;
    let direct = on_path(&lab, "n0", STREAMS_OUT, 0.0, "no mesh", || {
        measure(&lab, &client, &server, opts, None)
    })?;
    std::fs::write(&file, pods_yaml(true, (&client, "n0"), (&server, "n1")))?;
    wait_for_certificates(&lab, &["n0", "n1"])?;
    print_memory(&mesh.nodes, "before the mesh runs")?;
    eprintln!("measuring through the mesh (STRICT)");
    // First, before anything opened a tunnel connection between the nodes.
    let opened = node_metric(&lab, "n0", TUNNEL_CONNECTIONS)?;
    anyhow::ensure!(
        opened == 0.0,
        "n0 opened {opened} tunnel connections before the first measured one"
    );
    let mesh_spread = measure_spread(&lab, &client, &server, opts, true)?;
    let mut cpu = Vec::new();
    let bytes_before = node_metric(&lab, "n1", BYTES_IN)?;
    // iperf3 and two sockperf runs a round, each a tunnel stream.
    let streams = f64::from(3 * opts.rounds);
    let mesh_figures = on_path(&lab, "n0", STREAMS_OUT, streams, "mesh", || {
        measure(&lab, &client, &server, opts, Some((&mesh.nodes, &mut cpu)))
    })?;
    // At least what iperf3 moved at the rate it measured, for its seconds.
    let carried = node_metric(&lab, "n1", BYTES_IN)? - bytes_before;
    let expected = mesh_figures.gbits * 1e9 / 8.0 * f64::from(opts.seconds) * 0.5;
    anyhow::ensure!(
        carried >= expected,
        "the tunnel carried {carried} bytes into n1, less than half what iperf3 measured ({expected}): the mesh run did not go through it"
    );
    let node_rss_mb = print_memory(&mesh.nodes, "after the runs")?;
    Ok(Outcome {
        direct,
        mesh: mesh_figures,
        direct_spread,
        mesh_spread,
        node_rss_mb,
        node_cpu_pct: median(cpu),
    })
}

pub fn result_line(o: &Outcome) -> String {
    format!(
        "RESULT tunnel throughput_ratio={:.2} throughput_ratio_4={:.2} cps_ratio={:.2} rr_p50_added_us={:.0} rr_p99_added_us={:.0} node_rss_mb={:.1} node_cpu_pct_at_5000rps={:.1}",
        o.mesh.gbits / o.direct.gbits,
        o.mesh_spread.gbits_4 / o.direct_spread.gbits_4,
        o.mesh_spread.cps / o.direct_spread.cps,
        o.mesh.ul_p50_us - o.direct.ul_p50_us,
        o.mesh.ul_p99_us - o.direct.ul_p99_us,
        o.node_rss_mb,
        o.node_cpu_pct
    )
}

/// iperf3 and sockperf servers in `server`, given a second to listen.
pub(super) fn start_servers(lab: &Lab, server: &PodSpec) -> anyhow::Result<Vec<LabProcess>> {
    let servers = vec![
        spawn(
            lab,
            server,
            "iperf3",
            &["-s", "-p", &IPERF_PORT.to_string()],
        )?,
        spawn(
            lab,
            server,
            "sockperf",
            &["sr", "--tcp", "-p", &SOCKPERF_PORT.to_string()],
        )?,
    ];
    std::thread::sleep(Duration::from_secs(1));
    Ok(servers)
}

/// The bench namespace (enrolled in the mesh, STRICT, or not) with a
/// client and a server pod on the given nodes.
pub(super) fn pods_yaml(
    enrolled: bool,
    client: (&PodSpec, &str),
    server: (&PodSpec, &str),
) -> String {
    let ns = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench, labels: {{lacewing.io/mesh: {}}}}}\n",
        if enrolled { "enabled" } else { "disabled" }
    );
    let pod = |name: &str, (p, node): (&PodSpec, &str)| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{nodeName: {node}}}\nstatus: {{phase: Running, podIP: \"{}\"}}\n",
            p.ip4()
        )
    };
    [
        ns,
        "apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {mtlsMode: Strict}\n".into(),
        pod("client", client),
        pod("server", server),
    ]
    .join("---\n")
}

fn spawn(lab: &Lab, pod: &PodSpec, program: &str, args: &[&str]) -> anyhow::Result<LabProcess> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    lab.spawn_in_pod(pod, cmd)
        .with_context(|| format!("starting {program} (install it with `cargo xtask setup`)"))
}

pub(super) fn wait_for_certificates(lab: &Lab, nodes: &[&str]) -> anyhow::Result<()> {
    for &node in nodes {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let status = lab
                .node_get(&lab.node(node)?, "/status")
                .unwrap_or_default();
            if status.contains("spiffe://") {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("node {node} got no workload certificate in 15 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Tunnel connections (HTTP/2 over mutual TLS) a node opened to others.
const TUNNEL_CONNECTIONS: &str = "lacewing_tunnel_connections_opened_total";

/// The first connection's time, then iperf3 with four streams and the rate
/// of new connections, `rounds` times. In the mesh (`mesh`) it checks
/// the first connection opened the tunnel to the node and every later one
/// was a stream on it.
fn measure_spread(
    lab: &Lab,
    client: &PodSpec,
    server: &PodSpec,
    opts: &Options,
    mesh: bool,
) -> anyhow::Result<Spread> {
    let ip = server.ip4();
    let url = format!("http://{ip}:{HTTP_PORT}/");
    let timed = || -> anyhow::Result<f64> {
        let out = run_in(
            lab,
            client,
            "curl",
            &["-sS", "-o", "/dev/null", "-w", "%{time_total}", &url],
        )?;
        let secs: f64 = out
            .trim()
            .parse()
            .with_context(|| format!("curl's time_total: {out}"))?;
        Ok(secs * 1000.0)
    };
    // Each of n0's workers keeps its own connection to n1, and connections
    // go to the workers in turn: after the first, one more per other
    // worker, then the timed one finds its worker's connection open.
    let workers = if mesh { daemon_workers(lab, "n0")? } else { 1 };
    let first_ms = timed()?;
    for _ in 1..workers {
        timed()?;
    }
    let next_ms = timed()?;
    if mesh {
        let opened = node_metric(lab, "n0", TUNNEL_CONNECTIONS)?;
        anyhow::ensure!(
            opened == workers as f64,
            "n0 opened {opened} tunnel connections to one node on {workers} workers, expected one each"
        );
    }
    let (mut gbits_4, mut cps) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        let out = run_in(
            lab,
            client,
            "iperf3",
            &[
                "-c",
                &ip.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &opts.seconds.to_string(),
                "-P",
                "4",
                "-J",
            ],
        )?;
        gbits_4.push(iperf3_gbits(&out)?);
        let streams = node_metric(lab, "n0", STREAMS_OUT)?;
        let run =
            wrk::short_connections(lab, client, ip, HTTP_PORT, CPS_CONNECTIONS, opts.seconds)?;
        let streams = node_metric(lab, "n0", STREAMS_OUT)? - streams;
        if mesh {
            anyhow::ensure!(
                streams >= run.requests as f64,
                "wrk made {} connections but n0 opened {streams} tunnel streams: the run did not go through the mesh",
                run.requests
            );
        }
        cps.push(run.rate);
    }
    if mesh {
        let opened = node_metric(lab, "n0", TUNNEL_CONNECTIONS)?;
        anyhow::ensure!(
            opened == workers as f64,
            "n0 opened {opened} tunnel connections to one node on {workers} workers, expected one each (pooled)"
        );
    }
    let s = Spread {
        gbits_4: median(gbits_4),
        cps: median(cps),
        first_ms,
        next_ms,
    };
    eprintln!(
        "  iperf3 -P 4 {:.2} Gbit/s; {:.0} connections/s; first connection {:.2} ms, next {:.2} ms",
        s.gbits_4, s.cps, s.first_ms, s.next_ms
    );
    Ok(s)
}

/// The worker threads `node`'s daemon runs (its `/status`).
fn daemon_workers(lab: &Lab, node: &str) -> anyhow::Result<usize> {
    let status = lab.node_get(&lab.node(node)?, "/status")?;
    let status: serde_json::Value = serde_json::from_str(&status).context("/status")?;
    status["workers"]
        .as_u64()
        .and_then(|w| usize::try_from(w).ok())
        .with_context(|| format!("no worker count in {node}'s /status: {status}"))
}

/// What iperf3 (`-J`) measured at the receiver, in Gbit/s; no throughput
/// is an error, never a zero.
fn iperf3_gbits(out: &str) -> anyhow::Result<f64> {
    let json: serde_json::Value = serde_json::from_str(out).context("iperf3 -J output")?;
    let bits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .filter(|b| *b > 0.0)
        .with_context(|| format!("iperf3 measured no throughput:\n{out}"))?;
    Ok(bits / 1e9)
}

/// Runs every measurement `rounds` times; with `daemons`, also records
/// their CPU during each `ul` run.
pub(super) fn measure(
    lab: &Lab,
    client: &PodSpec,
    server: &PodSpec,
    opts: &Options,
    mut daemons: Option<(&Vec<LabProcess>, &mut Vec<f64>)>,
) -> anyhow::Result<Figures> {
    let ip = server.ip4().to_string();
    let secs = opts.seconds.to_string();
    let (mut gbits, mut p50, mut p99, mut pp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pp50, mut pp99) = (Vec::new(), Vec::new());
    let port = SOCKPERF_PORT.to_string();
    // One connection to the server pod for `secs` seconds.
    let sockperf = |mode: &[&str]| {
        let mut args = mode.to_vec();
        args.extend(["-i", &ip, "-p", &port, "-t", &secs]);
        run_in(lab, client, "sockperf", &args)
    };
    for _ in 0..opts.rounds {
        let out = run_in(
            lab,
            client,
            "iperf3",
            &["-c", &ip, "-p", &IPERF_PORT.to_string(), "-t", &secs, "-J"],
        )?;
        gbits.push(iperf3_gbits(&out)?);

        let before = match &daemons {
            Some((d, _)) => Some(cpu_ticks(d)?),
            None => None,
        };
        let out = sockperf(&[
            "ul",
            "--tcp",
            "--full-rtt",
            "--mps",
            "5000",
            "--reply-every",
            "1",
            "-m",
            "64",
        ])?;
        if let (Some(before), Some((d, cpu))) = (before, daemons.as_mut()) {
            let used = (cpu_ticks(d)? - before) as f64 / ticks_per_second();
            cpu.push(100.0 * used / f64::from(opts.seconds));
        }
        p50.push(percentile(&out, "50.000")?);
        p99.push(percentile(&out, "99.000")?);

        let out = sockperf(&["pp", "--tcp", "-m", "64"])?;
        pp.push(average(&out)?);
        pp50.push(percentile(&out, "50.000")?);
        pp99.push(percentile(&out, "99.000")?);
    }
    let f = Figures {
        gbits: median(gbits),
        ul_p50_us: median(p50),
        ul_p99_us: median(p99),
        pp_avg_us: median(pp),
        pp_p50_us: median(pp50),
        pp_p99_us: median(pp99),
    };
    eprintln!(
        "  iperf3 {:.2} Gbit/s; sockperf ul p50 {:.1} us p99 {:.1} us; pp avg {:.1} us p50 {:.1} us p99 {:.1} us",
        f.gbits, f.ul_p50_us, f.ul_p99_us, f.pp_avg_us, f.pp_p50_us, f.pp_p99_us
    );
    Ok(f)
}

fn run_in(lab: &Lab, pod: &PodSpec, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = lab.run_in_pod(pod, cmd)?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// sockperf's `---> percentile 99.000 =   123.456` (microseconds).
fn percentile(out: &str, which: &str) -> anyhow::Result<f64> {
    out.lines()
        .find(|l| l.contains(&format!("percentile {which}")))
        .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
        .with_context(|| format!("no percentile {which} in sockperf's output:\n{out}"))
}

/// sockperf's `avg-latency=12.345 (std-dev=...)` (microseconds).
fn average(out: &str) -> anyhow::Result<f64> {
    out.lines()
        .find_map(|l| {
            let rest = l.split("avg-latency=").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("no avg-latency in sockperf's output:\n{out}"))
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// utime + stime of all `daemons`, in clock ticks.
pub(super) fn cpu_ticks(daemons: &[LabProcess]) -> anyhow::Result<u64> {
    daemons.iter().map(|d| process_ticks(d.pid())).sum()
}

/// A process's CPU time so far (user and system), in clock ticks.
pub(super) fn process_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses.
    let ticks = stat.rsplit_once(')').and_then(|(_, rest)| {
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    });
    ticks.with_context(|| format!("no CPU times in {path}: {stat}"))
}

/// USER_HZ, the unit of /proc/<pid>/stat times: 100 on every Linux
/// architecture (the kernel fixes it for userspace).
pub(super) fn ticks_per_second() -> f64 {
    100.0
}

pub(super) fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    Ok(memory(pid)?.rss_mb)
}

/// A process's resident memory, in MB: all of it (`VmRSS`), and apart, the
/// anonymous part and the pages of files (its code and libraries); and the
/// most it was resident at once (`VmHWM`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Memory {
    pub(super) rss_mb: f64,
    anon_mb: f64,
    file_mb: f64,
    pub(super) peak_mb: f64,
}

pub(super) fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok(Memory {
        rss_mb: field("VmRSS:")?,
        anon_mb: field("RssAnon:")?,
        file_mb: field("RssFile:")?,
        peak_mb: field("VmHWM:")?,
    })
}

/// Prints each daemon's resident memory `when`, and returns the largest.
pub(super) fn print_memory(nodes: &[crate::lab::LabProcess], when: &str) -> anyhow::Result<f64> {
    let mut largest: f64 = 0.0;
    for (index, node) in nodes.iter().enumerate() {
        let m = memory(node.pid())?;
        eprintln!(
            "  n{index} daemon {when}: {:.1} MB resident ({:.1} MB anonymous, {:.1} MB of files: its code and libraries)",
            m.rss_mb, m.anon_mb, m.file_mb
        );
        largest = largest.max(m.rss_mb);
    }
    Ok(largest)
}
