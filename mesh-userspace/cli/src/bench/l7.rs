//! `lacewing bench l7`: a pod on n0 to a Service whose two nginx pods run
//! on n1, HTTP/1.1 keep-alive and h2c, 64 B and 1 KiB responses, in one
//! run: no mesh (the namespace not enrolled), an nginx reverse proxy in a
//! pod of n0 (one worker, keep-alive upstream; the peer), the mesh at L4
//! (enrolled, no route), and the mesh at L7 (a route with a header rule and
//! two weighted backends, an L7 allow policy at the destination). h2load
//! measures the most requests/s over 64 connections, and the latency of
//! every request at a fixed 1,000 and 5,000 requests/s from 10 independent
//! clients (their per-request logs: p50 and p99); the node daemons' CPU is
//! read over the L4 and L7 runs at a fixed rate, their RSS at the end.
//!
//! Then the cost of telemetry: the 1 KiB HTTP/1.1 case at a fixed 5,000
//! requests/s with access logs and traces off, then on (every request
//! logged by both daemons, and traced: h2load sends a sampled
//! `traceparent`, so both daemons export a span per request to a real
//! OTLP collector, rotel), alternately, twice each; the daemons' CPU on
//! over off.
//!
//! Then a failure run: a Service with three nginx endpoints, one answering
//! every request 503, at 1,000 requests/s from 60 connections, without a
//! TrafficPolicy (the kernel balances each connection: a third of them fail
//! every request) and with retries and outlier detection; the share of
//! requests that succeed and the p99 of those that did.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    on_path,
    tunnel::{cpu_ticks, median, print_memory, wait_for_certificates},
};
use crate::lab::{Lab, LabProcess, PodSpec};

#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds per measurement.
    pub seconds: u32,
}

/// What one way of running measured, for one protocol and size.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub max_rps: f64,
    pub p50_1k_us: f64,
    pub p99_1k_us: f64,
    pub p50_5k_us: f64,
    pub p99_5k_us: f64,
}

#[derive(Clone, Debug)]
pub struct Row {
    /// `h1` or `h2c`.
    pub protocol: &'static str,
    pub bytes: usize,
    pub direct: Figures,
    pub nginx: Figures,
    pub l4: Figures,
    pub l7: Figures,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// Both daemons' CPU per 1,000 requests/s over the L7 runs at a fixed
    /// rate, in cores.
    pub cpu_per_1k_rps: f64,
    /// The same over the L4 runs (the tunnel alone, no HTTP).
    pub cpu_per_1k_rps_l4: f64,
    /// The nginx proxy's CPU per 1,000 requests/s over its runs at a fixed
    /// rate: what one plain HTTP proxy costs on this machine.
    pub cpu_per_1k_rps_nginx: f64,
    /// The larger daemon's RSS at the end.
    pub node_rss_mb: f64,
    pub failure: FailureRun,
    pub telemetry: TelemetryRun,
}

/// Both daemons' CPU (cores) at 5,000 requests/s with access logs and
/// traces off and on (medians).
#[derive(Clone, Debug, Default)]
pub struct TelemetryRun {
    pub off_cores: f64,
    pub on_cores: f64,
}

/// The failure run: (share of requests answered 2xx, their p99 in
/// microseconds), without and with the TrafficPolicy.
#[derive(Clone, Debug, Default)]
pub struct FailureRun {
    pub without: (f64, f64),
    pub with_policy: (f64, f64),
    /// Endpoints ejected during the run with the policy.
    pub ejections: f64,
}

/// (protocol, response bytes, nginx port on the server pods, ClusterIP,
/// nginx proxy port on n0).
const CASES: [(&str, usize, u16, &str, u16); 4] = [
    ("h1", 64, 8080, "10.96.0.40", 9080),
    ("h1", 1024, 8081, "10.96.0.41", 9081),
    ("h2c", 64, 8082, "10.96.0.42", 9082),
    ("h2c", 1024, 8083, "10.96.0.43", 9083),
];

const REQUESTS_OUT: &str = "lacewing_requests_total{direction=\"outbound\"";
const STREAMS_OUT: &str = "lacewing_tunnel_streams_opened_total{direction=\"outbound\"}";

pub fn run(bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let lab = Lab::new(2, 2)?;
    let outcome = measure_all(&lab, bin_dir, opts);
    super::keep_logs_on_error(&lab, outcome)
}

fn measure_all(lab: &Lab, bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let (client, proxy) = (lab.pod("n0-p0")?, lab.pod("n0-p1")?);
    let servers = [lab.pod("n1-p0")?, lab.pod("n1-p1")?];
    // Traces go to the collector the telemetry run starts; until then no
    // request is sampled (and none carries a traceparent).
    let mesh = lab.start_mesh_with(bin_dir, &|node| {
        vec![
            "--otlp-endpoint".into(),
            format!("http://{}:4317", crate::lab::CONTROLLER_IP),
            "--trace-sampling".into(),
            "0".into(),
            "--access-log-file".into(),
            lab.state_dir()
                .join(format!("{}-access.log", node.name()))
                .display()
                .to_string(),
        ]
    })?;
    let mut nginx: Vec<LabProcess> = Vec::new();
    for (_, bytes, port, _, _) in CASES {
        // The body nginx sends is the text and a newline.
        let body = "x".repeat(bytes - 1);
        for s in &servers {
            let h2 = CASES.iter().any(|c| c.2 == port && c.0 == "h2c");
            nginx.push(if h2 {
                lab.start_h2c_server(s, port, &body)?
            } else {
                lab.start_http_server(s, port, &body)?
            });
        }
    }
    let proxied: Vec<(u16, String, bool)> = CASES
        .iter()
        .map(|(p, _, _, vip, port)| (*port, format!("{vip}:80"), *p == "h2c"))
        .collect();
    let nginx_proxy = [lab.start_nginx_proxy(&proxy, &proxied)?];
    let file = mesh.folder.join("bench.yaml");
    std::fs::write(&file, config_yaml(false, &client, &proxy, &servers, false))?;
    std::thread::sleep(Duration::from_secs(1));

    let mut rows: Vec<Row> = CASES
        .iter()
        .map(|(p, b, ..)| Row {
            protocol: p,
            bytes: *b,
            direct: Figures::default(),
            nginx: Figures::default(),
            l4: Figures::default(),
            l7: Figures::default(),
        })
        .collect();
    eprintln!("no mesh, and the nginx proxy ({} s each)", opts.seconds);
    let mut cpu_nginx = Vec::new();
    on_path(lab, "n0", STREAMS_OUT, 0.0, "no mesh", || {
        for (row, (_, _, _, vip, port)) in rows.iter_mut().zip(CASES) {
            row.direct = measure(lab, &client, row.protocol, &format!("{vip}:80"), opts, None)?;
            let at = format!("{}:{port}", proxy.ip4());
            row.nginx = measure(
                lab,
                &client,
                row.protocol,
                &at,
                opts,
                Some((&nginx_proxy, &mut cpu_nginx)),
            )?;
        }
        Ok(())
    })?;
    let cpu_per_1k_rps_nginx = median(cpu_nginx);
    if cpu_per_1k_rps_nginx <= 0.0 {
        bail!("the nginx proxy's CPU did not move over its runs: it was not measured");
    }
    eprintln!("the nginx proxy used {cpu_per_1k_rps_nginx:.3} cores per 1,000 requests/s (median)");

    std::fs::write(&file, config_yaml(true, &client, &proxy, &servers, false))?;
    wait_for_certificates(lab, &["n0", "n1"])?;
    eprintln!("the mesh at L4 (no route)");
    let mut cpu_l4 = Vec::new();
    // Each measurement opens at least one tunnel stream.
    on_path(
        lab,
        "n0",
        STREAMS_OUT,
        3.0 * CASES.len() as f64,
        "mesh L4",
        || {
            for (row, (_, _, _, vip, _)) in rows.iter_mut().zip(CASES) {
                row.l4 = measure(
                    lab,
                    &client,
                    row.protocol,
                    &format!("{vip}:80"),
                    opts,
                    Some((&mesh.nodes, &mut cpu_l4)),
                )?;
            }
            Ok(())
        },
    )?;
    let cpu_per_1k_rps_l4 = median(cpu_l4);
    eprintln!(
        "the mesh at L4 used {cpu_per_1k_rps_l4:.3} cores per 1,000 requests/s (median; both daemons)"
    );

    std::fs::write(&file, config_yaml(true, &client, &proxy, &servers, true))?;
    wait_for_routes(lab, CASES.len())?;
    eprintln!("the mesh at L7 (route, weighted backends, L7 policy)");
    let mut cpu = Vec::new();
    let daemons = &mesh.nodes;
    // Every request of the fixed-rate runs is routed (and counted).
    let at_least = f64::from(opts.seconds) * 6000.0 * 0.9 * CASES.len() as f64;
    on_path(lab, "n0", REQUESTS_OUT, at_least, "mesh L7", || {
        for (row, (_, _, _, vip, _)) in rows.iter_mut().zip(CASES) {
            row.l7 = measure(
                lab,
                &client,
                row.protocol,
                &format!("{vip}:80"),
                opts,
                Some((daemons, &mut cpu)),
            )?;
        }
        Ok(())
    })?;
    let node_rss_mb = print_memory(daemons, "after the runs")?;
    let telemetry = telemetry_run(lab, bin_dir, &mesh, &client, opts)?;
    let failure = failure_run(lab, &file, &client, &proxy, &servers, opts)?;
    drop(nginx);
    drop(nginx_proxy);
    Ok(Outcome {
        rows,
        cpu_per_1k_rps: median(cpu),
        cpu_per_1k_rps_l4,
        cpu_per_1k_rps_nginx,
        node_rss_mb,
        failure,
        telemetry,
    })
}

/// A sampled `traceparent`: every request carrying it is traced.
const TRACEPARENT: &str = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The telemetry run (see the module's docs).
fn telemetry_run(
    lab: &Lab,
    bin_dir: &Path,
    mesh: &crate::lab::Mesh,
    client: &PodSpec,
    opts: &Options,
) -> anyhow::Result<TelemetryRun> {
    let rotel = bin_dir.join("../otel/rotel/rotel-agent");
    anyhow::ensure!(
        rotel.is_file(),
        "{} is missing: `cargo xtask setup` installs the OTLP collector",
        rotel.display()
    );
    let mut cmd = Command::new(&rotel);
    cmd.args([
        "start",
        "--otlp-grpc-endpoint",
        &format!("{}:4317", crate::lab::CONTROLLER_IP),
        "--otlp-http-endpoint",
        &format!("{}:4318", crate::lab::CONTROLLER_IP),
        "--exporter",
        "blackhole",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut collector = lab.spawn_on_underlay(cmd).context("starting rotel")?;
    collector.wait_listening(4317, Duration::from_secs(10))?;
    let logging = mesh.folder.join("meshconfig.yaml");
    let target = format!("{}:80", CASES[1].3);
    let lines = "lacewing_access_log_lines_total{outcome=\"written\"}";
    let spans = "lacewing_trace_spans_total{outcome=\"exported\"}";
    let (mut off, mut on) = (Vec::new(), Vec::new());
    eprintln!("telemetry off and on, h1 1 KiB at 5,000 requests/s");
    for _ in 0..2 {
        for logged in [false, true] {
            if logged {
                std::fs::write(
                    &logging,
                    "apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {mtlsMode: Permissive, accessLogging: true}\n",
                )?;
            } else if logging.exists() {
                std::fs::remove_file(&logging)?;
            }
            wait_until("both nodes apply the access log switch", || {
                ["n0", "n1"].iter().all(|n| {
                    lab.node(n)
                        .and_then(|n| {
                            Ok(lab.node_http(&n, crate::lab::ADMIN_PORT, "/config_dump")?)
                        })
                        .is_ok_and(|dump| {
                            dump.contains(&format!("\"access_log\": {logged}"))
                                && !dump.contains(&format!("\"access_log\": {}", !logged))
                        })
                })
            })?;
            let before = (
                super::node_metric(lab, "n0", lines)?,
                super::node_metric(lab, "n0", spans)?,
            );
            let ticks = cpu_ticks(&mesh.nodes)?;
            let headers: &[&str] = if logged { &[TRACEPARENT] } else { &[] };
            let (rps, _) = h2load(lab, client, "h1", &target, opts, 10, Some(500), headers)?;
            let cores = (cpu_ticks(&mesh.nodes)? - ticks) as f64 / 100.0 / f64::from(opts.seconds);
            // The lines and spans written during the run: all of them, or
            // this did not measure telemetry (the writer and exporter run
            // at most 50 ms and 200 ms behind).
            let after = wait_for_telemetry(
                lab,
                lines,
                spans,
                before,
                logged,
                rps * f64::from(opts.seconds),
            )?;
            eprintln!(
                "    {}: {rps:.0} requests/s, the daemons used {cores:.3} cores; n0 wrote {:.0} lines, exported {:.0} spans",
                if logged { "on " } else { "off" },
                after.0 - before.0,
                after.1 - before.1
            );
            if logged {
                on.push(cores)
            } else {
                off.push(cores)
            }
        }
    }
    let _ = std::fs::remove_file(&logging);
    collector.terminate(Duration::from_secs(5))?;
    Ok(TelemetryRun {
        off_cores: median(off),
        on_cores: median(on),
    })
}

/// n0's written lines and exported spans once those of a run are counted:
/// with telemetry on, at least 90% of `requests` each; off, none.
fn wait_for_telemetry(
    lab: &Lab,
    lines: &str,
    spans: &str,
    before: (f64, f64),
    on: bool,
    requests: f64,
) -> anyhow::Result<(f64, f64)> {
    let read = || -> anyhow::Result<(f64, f64)> {
        Ok((
            super::node_metric(lab, "n0", lines)?,
            super::node_metric(lab, "n0", spans)?,
        ))
    };
    if !on {
        let now = read()?;
        anyhow::ensure!(
            now == before,
            "telemetry off, yet n0 wrote lines or exported spans: {before:?} -> {now:?}"
        );
        return Ok(now);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = None;
    loop {
        let now = read()?;
        // Enough, and no more coming: the exporter sends what was still
        // queued up to 200 ms later, which must not land in the next run.
        if now.0 - before.0 >= 0.9 * requests
            && now.1 - before.1 >= 0.9 * requests
            && last == Some(now)
        {
            return Ok(now);
        }
        last = Some(now);
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "telemetry on, but n0 wrote {} lines and exported {} spans for about {requests:.0} requests: the run did not take the path it names",
            now.0 - before.0,
            now.1 - before.1
        );
        // Longer than the exporter's 200 ms between batches.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The failing Service's ClusterIP, its healthy and failing nginx ports.
const FLAKY: (&str, u16, u16) = ("10.96.0.50", 8090, 8091);

/// The failure run (see the module's docs).
fn failure_run(
    lab: &Lab,
    file: &Path,
    client: &PodSpec,
    proxy: &PodSpec,
    servers: &[PodSpec; 2],
    opts: &Options,
) -> anyhow::Result<FailureRun> {
    let (vip, good, bad) = FLAKY;
    let _nginx = [
        lab.start_http_server(&servers[0], good, "ok")?,
        lab.start_http_server(&servers[1], good, "ok")?,
        lab.start_http_server_with_status(&servers[0], bad, "failing", 503)?,
    ];
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: flaky, namespace: bench}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: flaky-good, namespace: bench, labels: {{kubernetes.io/service-name: flaky}}}}\naddressType: IPv4\nports: [{{name: http, port: {good}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{}\", \"{}\"]}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: flaky-bad, namespace: bench, labels: {{kubernetes.io/service-name: flaky}}}}\naddressType: IPv4\nports: [{{name: http, port: {bad}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n",
        servers[0].ip4(),
        servers[1].ip4(),
        servers[0].ip4(),
    );
    let policy = "apiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: flaky, namespace: bench}\nspec:\n  targetRef: {name: flaky}\n  retries: {attempts: 2, retryOn: [5xx]}\n  outlierDetection: {consecutive5xx: 3, interval: 10s, baseEjectionTime: 30s}\n";
    let base = config_yaml(true, client, proxy, servers, true);
    std::fs::write(file, format!("{base}---\n{service}"))?;
    wait_until("the flaky Service answers the client", || {
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
        ])
        .arg(format!("http://{vip}/"));
        let code = lab
            .run_in_pod(client, curl)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        code == "200" || code == "503"
    })?;
    eprintln!("failure run: three endpoints, one answering 503; no policy");
    let without = fixed_rate_outcomes(lab, client, &format!("{vip}:80"), opts)?;
    std::fs::write(file, format!("{base}---\n{service}---\n{policy}"))?;
    let node = lab.node("n0")?;
    wait_until("n0 applies the TrafficPolicy", || {
        lab.node_get(&node, "/routes")
            .unwrap_or_default()
            .contains("\"policy\": \"bench/flaky\"")
    })?;
    eprintln!("failure run: retries (2, on 5xx) and outlier detection (3 consecutive 5xx)");
    let ejections = |lab: &Lab| {
        super::node_metric(
            lab,
            "n0",
            "lacewing_traffic_policy_events_total{destination_service=\"bench/flaky\",event=\"ejection\"}",
        )
    };
    let before = ejections(lab)?;
    // Every request is routed by n0 (and counted there).
    let at_least = f64::from(opts.seconds) * 1000.0 * 0.9;
    let with_policy = on_path(lab, "n0", REQUESTS_OUT, at_least, "failure run", || {
        fixed_rate_outcomes(lab, client, &format!("{vip}:80"), opts)
    })?;
    let run = FailureRun {
        without: success_and_p99(&without),
        with_policy: success_and_p99(&with_policy),
        ejections: ejections(lab)? - before,
    };
    eprintln!(
        "  no policy: {:.4} succeeded, p99 {:.0} us; with the policy: {:.4} succeeded, p99 {:.0} us ({} ejections)",
        run.without.0, run.without.1, run.with_policy.0, run.with_policy.1, run.ejections
    );
    Ok(run)
}

/// Until `ready()` holds (15 s at most).
fn wait_until(what: &str, ready: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if ready() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (status, latency in microseconds) of every request of a fixed-rate run
/// at 1,000 requests/s over HTTP/1.1 keep-alive: 10 h2load processes of 6
/// connections each (60 connections, so that the kernel's per-connection
/// choice spreads over the endpoints), failures allowed.
fn fixed_rate_outcomes(
    lab: &Lab,
    client: &PodSpec,
    target: &str,
    opts: &Options,
) -> anyhow::Result<Vec<(u16, f64)>> {
    let mut running = Vec::new();
    for i in 0..10 {
        let log = lab.state_dir().join(format!("h2load-failure-{i}.log"));
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new("h2load");
        cmd.args([
            "--h1",
            "-c",
            "6",
            "--rps=17",
            "-D",
            &opts.seconds.to_string(),
        ])
        .arg("--warm-up-time=1")
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{target}/"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        running.push((
            lab.spawn_in_pod(client, cmd).context("starting h2load")?,
            log,
        ));
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut outcomes = Vec::new();
    for (process, log) in running {
        let out = process.wait_with_output().context("running h2load")?;
        anyhow::ensure!(
            out.status.success(),
            "h2load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&log).context("reading h2load's request log")?;
        outcomes.extend(text.lines().filter_map(|l| {
            let mut cols = l.split('\t').skip(1);
            Some((
                cols.next()?.trim().parse().ok()?,
                cols.next()?.trim().parse().ok()?,
            ))
        }));
    }
    anyhow::ensure!(
        outcomes.len() as f64 >= f64::from(opts.seconds) * 1000.0 * 0.9,
        "h2load logged {} requests, not about {} a second",
        outcomes.len(),
        1000
    );
    Ok(outcomes)
}

/// The share of `outcomes` answered 2xx, and their p99 latency.
fn success_and_p99(outcomes: &[(u16, f64)]) -> (f64, f64) {
    let ok: Vec<f64> = outcomes
        .iter()
        .filter(|(s, _)| (200..300).contains(s))
        .map(|(_, l)| *l)
        .collect();
    (
        ok.len() as f64 / outcomes.len() as f64,
        percentile(&ok, 0.99),
    )
}

pub fn result_line(o: &Outcome) -> String {
    let ratio = |f: fn(&Row) -> f64| median(o.rows.iter().map(f).collect());
    format!(
        "RESULT l7 rps_l7_vs_direct={:.2} rps_l7_vs_nginx={:.2} p50_added_us_1k={:.0} p99_added_us_1k={:.0} cpu_per_1k_rps={:.3} node_rss_mb={:.1} success_with_policy={:.4} p99_with_policy_us={:.0} telemetry_cpu_on_vs_off={:.3} p99_added_us_1k_l4={:.0} p99_added_us_1k_nginx={:.0} cpu_per_1k_rps_l4={:.3} cpu_per_1k_rps_nginx={:.3}",
        ratio(|r| r.l7.max_rps / r.direct.max_rps),
        ratio(|r| r.l7.max_rps / r.nginx.max_rps),
        ratio(|r| r.l7.p50_1k_us - r.direct.p50_1k_us),
        ratio(|r| r.l7.p99_1k_us - r.direct.p99_1k_us),
        o.cpu_per_1k_rps,
        o.node_rss_mb,
        o.failure.with_policy.0,
        o.failure.with_policy.1,
        o.telemetry.on_cores / o.telemetry.off_cores,
        ratio(|r| r.l4.p99_1k_us - r.direct.p99_1k_us),
        ratio(|r| r.nginx.p99_1k_us - r.direct.p99_1k_us),
        o.cpu_per_1k_rps_l4,
        o.cpu_per_1k_rps_nginx,
    )
}

/// The bench namespace (enrolled or not), its pods, one Service per case
/// over both server pods and, with `routed`, one Service per case and
/// server (`-v1`, `-v2`), an HTTPRoute per case (a header rule to v2, else
/// 90/10) and an L7 allow policy on the servers.
fn config_yaml(
    enrolled: bool,
    client: &PodSpec,
    proxy: &PodSpec,
    servers: &[PodSpec; 2],
    routed: bool,
) -> String {
    let mut docs = vec![format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench, labels: {{lacewing.io/mesh: {}}}}}\n",
        if enrolled { "enabled" } else { "disabled" }
    )];
    let pod = |name: &str, node: &str, p: &PodSpec, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}}}\nstatus: {{phase: Running, podIP: \"{}\"}}\n",
            p.ip4()
        )
    };
    docs.push(pod("client", "n0", client, "client"));
    docs.push(pod("proxy", "n0", proxy, "proxy"));
    docs.push(pod("server-0", "n1", &servers[0], "server"));
    docs.push(pod("server-1", "n1", &servers[1], "server"));
    let service = |name: &str, ip: Option<&str>, port: u16, endpoints: &[&PodSpec]| {
        let cluster_ip = ip.map_or(String::new(), |ip| format!("clusterIP: {ip}, "));
        let addresses: Vec<String> = endpoints
            .iter()
            .map(|p| format!("\"{}\"", p.ip4()))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{{cluster_ip}ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints: [{{addresses: [{}]}}]\n",
            addresses.join(", ")
        )
    };
    for (i, (_, _, port, vip, _)) in CASES.iter().enumerate() {
        let name = format!("web{i}");
        docs.push(service(
            &name,
            Some(vip),
            *port,
            &[&servers[0], &servers[1]],
        ));
        if routed {
            // ClusterIPs of the version Services: 10.96.1.<2i> and <2i+1>.
            let v1 = format!("10.96.1.{}", 2 * i + 10);
            let v2 = format!("10.96.1.{}", 2 * i + 11);
            docs.push(service(
                &format!("{name}-v1"),
                Some(&v1),
                *port,
                &[&servers[0]],
            ));
            docs.push(service(
                &format!("{name}-v2"),
                Some(&v2),
                *port,
                &[&servers[1]],
            ));
            docs.push(format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  parentRefs: [{{kind: Service, name: {name}, port: 80}}]\n  rules:\n  - matches: [{{headers: [{{name: x-canary, value: \"1\"}}]}}]\n    backendRefs: [{{name: {name}-v2, port: 80}}]\n  - backendRefs: [{{name: {name}-v1, port: 80, weight: 90}}, {{name: {name}-v2, port: 80, weight: 10}}]\n"
            ));
        }
    }
    if routed {
        docs.push("apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: bench}\nspec: {selector: {matchLabels: {app: server}}, action: Allow, rules: [{to: [{methods: [GET]}]}]}\n".into());
    }
    docs.join("---\n")
}

/// Until the client's node routes every case's frontend.
fn wait_for_routes(lab: &Lab, n: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let routes = lab
            .node_get(&lab.node("n0")?, "/routes")
            .unwrap_or_default();
        if routes.matches("\"frontend\"").count() >= n {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("n0 did not take the {n} routes in 15 s: {routes}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The most requests/s (64 connections), then p50/p99 at 1,000 and 5,000
/// requests/s; with `daemons`, their CPU per 1,000 requests/s over the
/// fixed-rate runs.
fn measure(
    lab: &Lab,
    client: &PodSpec,
    protocol: &str,
    target: &str,
    opts: &Options,
    mut daemons: Option<(&[LabProcess], &mut Vec<f64>)>,
) -> anyhow::Result<Figures> {
    let (max_rps, _) = h2load(lab, client, protocol, target, opts, 64, None, &[])?;
    let mut at = |rate: u32| -> anyhow::Result<(f64, f64)> {
        let before = match &daemons {
            Some((d, _)) => Some(cpu_ticks(d)?),
            None => None,
        };
        let (rps, latencies) = h2load(
            lab,
            client,
            protocol,
            target,
            opts,
            10,
            Some(rate / 10),
            &[],
        )?;
        if let (Some(before), Some((d, cpu))) = (before, daemons.as_mut()) {
            let cores = (cpu_ticks(d)? - before) as f64 / 100.0 / f64::from(opts.seconds);
            cpu.push(cores / (rps / 1000.0));
            eprintln!(
                "    at {rate}/s: {:.3} cores per 1,000 requests/s",
                cores / (rps / 1000.0)
            );
        }
        Ok((percentile(&latencies, 0.50), percentile(&latencies, 0.99)))
    };
    let (p50_1k_us, p99_1k_us) = at(1000)?;
    let (p50_5k_us, p99_5k_us) = at(5000)?;
    let f = Figures {
        max_rps,
        p50_1k_us,
        p99_1k_us,
        p50_5k_us,
        p99_5k_us,
    };
    eprintln!(
        "  {protocol} {target}: max {:.0} req/s; at 1k p50 {:.0} us p99 {:.0} us; at 5k p50 {:.0} us p99 {:.0} us",
        f.max_rps, f.p50_1k_us, f.p99_1k_us, f.p50_5k_us, f.p99_5k_us
    );
    Ok(f)
}

/// One measurement for `opts.seconds`: requests/s achieved, and with a
/// per-connection `rps`, every request's latency (microseconds, from the
/// request logs). Fails on any failed request.
///
/// At a fixed rate each connection is its own h2load, started 1/rate s
/// after the one before: h2load starts all of one process's clients' rate
/// timers at once, so its 10 connections would send in bursts of 10 every
/// 10 ms, and a burst's p50 is how long 10 requests take to drain rather
/// than what one request costs. Independent clients are what a Service
/// sees.
#[expect(
    clippy::too_many_arguments,
    reason = "one h2load run's parts, each used once"
)]
fn h2load(
    lab: &Lab,
    client: &PodSpec,
    protocol: &str,
    target: &str,
    opts: &Options,
    connections: u32,
    rps: Option<u32>,
    headers: &[&str],
) -> anyhow::Result<(f64, Vec<f64>)> {
    let command = |clients: u32, log: Option<&Path>| {
        let mut cmd = Command::new("h2load");
        for h in headers {
            cmd.args(["-H", h]);
        }
        cmd.args(["-c", &clients.to_string(), "-D", &opts.seconds.to_string()]);
        cmd.arg("--warm-up-time=1");
        if protocol == "h1" {
            cmd.arg("--h1");
        }
        if let (Some(rps), Some(log)) = (rps, log) {
            cmd.arg(format!("--rps={rps}"));
            cmd.arg(format!("--log-file={}", log.display()));
        }
        cmd.arg(format!("http://{target}/"));
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let Some(rps) = rps else {
        let out = lab
            .spawn_in_pod(client, command(connections, None))
            .and_then(crate::lab::LabProcess::wait_with_output)
            .context("running h2load")?;
        return Ok((achieved(&out)?, Vec::new()));
    };
    let stagger = Duration::from_secs_f64(1.0 / f64::from(rps * connections));
    let mut running = Vec::new();
    for i in 0..connections {
        let log = lab.state_dir().join(format!("h2load-{i}.log"));
        let _ = std::fs::remove_file(&log);
        running.push((
            lab.spawn_in_pod(client, command(1, Some(&log)))
                .context("starting h2load")?,
            log,
        ));
        std::thread::sleep(stagger);
    }
    let (mut total, mut latencies) = (0.0, Vec::new());
    for (process, log) in running {
        let out = process.wait_with_output().context("running h2load")?;
        total += achieved(&out)?;
        let l = request_log(&log).context("reading h2load's request log")?;
        anyhow::ensure!(!l.is_empty(), "h2load logged no request");
        latencies.extend(l);
    }
    Ok((total, latencies))
}

/// The requests/s an h2load run achieved; an error unless every request
/// succeeded.
fn achieved(out: &std::process::Output) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "h2load failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .with_context(|| format!("no requests line in h2load's output:\n{text}"))?;
    let field = |name: &str| -> Option<u64> {
        requests
            .split(',')
            .find(|p| p.trim_end().ends_with(name))?
            .split_whitespace()
            .find_map(|w| w.parse().ok())
    };
    let (succeeded, failed) = (field("succeeded"), field("failed"));
    if failed != Some(0) || succeeded.unwrap_or(0) == 0 {
        bail!("h2load: {requests} (every request must succeed)\n{text}");
    }
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("finished in ")?;
            rest.split(", ")
                .nth(1)?
                .strip_suffix(" req/s")?
                .parse::<f64>()
                .ok()
        })
        .with_context(|| format!("no req/s in h2load's output:\n{text}"))
}

/// h2load's per-request log: start time, status, latency (microseconds),
/// tab-separated.
fn request_log(log: &Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(log)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .collect())
}

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i]
}
