//! Hostile and broken peers against the daemons' ports: a flood of idle
//! connections and stalled TLS handshakes on :15008 and on the controller's
//! :15012, bad bytes and bad requests on :15008, and a daemon out of files.
//! The attackers sit on the underlay at addresses of their own.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)
//!   n0-p0 client (sa client)
//!   n1-p0 web (sa web), n1-p1 web (sa web): xfer.py servers on 9000
//!   Service shop/web 10.96.0.20:80 -> n1-p0:9000
//!   the controller on the underlay (10.200.0.254:15012)
//!   attackers on the underlay: 10.200.0.200 (idle), .201-.205 (stalled)
//! ```

use std::{fs, net::Ipv4Addr, process::Command, time::Duration};

use lacewing::lab::{CONTROLLER_IP, LabProcess};
use lacewing_tests::{
    PYTHON,
    mesh_lab::{Credentials, MeshLab, PORT, VIP, field, poll},
    tool,
};

/// The handshake timeout n1 runs with here.
const HANDSHAKE_TIMEOUT_S: u64 = 10;
/// The default cap on one source's handshakes in progress.
const PER_SOURCE_HANDSHAKES: u32 = 64;
/// The idle flood: connections that send nothing.
const IDLE: u32 = 5000;
/// The stalled handshakes: five addresses, 60 each.
const STALLERS: [u8; 5] = [201, 202, 203, 204, 205];
const STALLED_EACH: u32 = 60;

fn attacker(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, last)
}

/// n1 times handshakes out after [`HANDSHAKE_TIMEOUT_S`] and closes a
/// tunnel connection idle for 1 s, so that every probe below opens a new
/// one.
fn mesh() -> MeshLab {
    MeshLab::build_with(&[], true, &|_, node| {
        if node.name() == "n1" {
            vec![
                "--handshake-timeout".into(),
                format!("{HANDSHAKE_TIMEOUT_S}s"),
                "--idle-timeout".into(),
                "1s".into(),
            ]
        } else {
            Vec::new()
        }
    })
}

/// Starts flood.py on the underlay against `target:port`: [`IDLE`] idle
/// connections from .200 and [`STALLED_EACH`] stalled handshakes from each
/// of [`STALLERS`]; returns once every connection is made.
fn flood(m: &MeshLab, target: &str, port: u16) -> LabProcess {
    let ready = m.lab.state_dir().join(format!("flood-{port}.ready"));
    let mut cmd = Command::new(PYTHON);
    cmd.arg(tool("flood.py"))
        .args([target, &port.to_string()])
        .args(["--from", &format!("{}:{IDLE}", attacker(200))]);
    m.lab.add_underlay_address(attacker(200)).unwrap();
    for last in STALLERS {
        m.lab.add_underlay_address(attacker(last)).unwrap();
        cmd.args([
            "--from",
            &format!("{}:{STALLED_EACH}:stall", attacker(last)),
        ]);
    }
    cmd.args(["--ready", ready.to_str().unwrap(), "--hold", "40"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let flood = m.lab.spawn_on_underlay(cmd).unwrap();
    poll(
        "the flood's connections are made",
        Duration::from_secs(60),
        || ready.exists().then_some(()),
    );
    flood
}

/// What flood.py says about one source address.
#[derive(Debug)]
struct Outcome {
    opened: u32,
    failed: u32,
    at_once: u32,
    later: u32,
    open: u32,
    later_min_ms: u64,
    later_max_ms: u64,
}

fn outcomes(flood: LabProcess) -> Vec<(String, Outcome)> {
    let out = flood.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let n = |name: &str| field(l, name).parse().unwrap();
            (
                field(l, "from").to_owned(),
                Outcome {
                    opened: n("opened") as u32,
                    failed: n("failed") as u32,
                    at_once: n("at_once") as u32,
                    later: n("later") as u32,
                    open: n("open") as u32,
                    later_min_ms: n("later_min_ms"),
                    later_max_ms: n("later_max_ms"),
                },
            )
        })
        .collect()
}

/// Checks that from the idle source all but [`PER_SOURCE_HANDSHAKES`] were
/// reset at once, and that those and every stalled handshake were closed by
/// the handshake timeout.
fn assert_capped_and_timed_out(outcomes: &[(String, Outcome)]) {
    assert_eq!(outcomes.len(), 1 + STALLERS.len(), "{outcomes:?}");
    let timeout_ms = HANDSHAKE_TIMEOUT_S * 1000;
    for (from, o) in outcomes {
        let (opened, held) = if *from == attacker(200).to_string() {
            (IDLE, PER_SOURCE_HANDSHAKES)
        } else {
            (STALLED_EACH, STALLED_EACH)
        };
        assert_eq!(
            (o.opened, o.failed, o.at_once, o.later, o.open),
            (opened, 0, opened - held, held, 0),
            "{from}: {o:?}"
        );
        // Measured from the client's connect, a little before the accept.
        assert!(
            (timeout_ms - 1000..=timeout_ms + 3000).contains(&o.later_min_ms)
                && o.later_max_ms <= timeout_ms + 3000,
            "{from}: closed after {}..{} ms, not at the {timeout_ms} ms timeout",
            o.later_min_ms,
            o.later_max_ms
        );
    }
}

/// Milliseconds of each of `n` new mesh connections from n0-p0 to the web
/// Service on n1, 1.5 s apart (so each opens a new tunnel connection).
fn probes(m: &MeshLab, n: u32) -> Vec<f64> {
    let out = m.run_tool(
        "n0-p0",
        "xfer.py",
        &["probe", VIP, "80", &n.to_string(), "1.5"],
    );
    field(&out, "ms")
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_kb(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_files(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn idle_connections_and_stalled_handshakes_on_the_tunnel_port_are_capped_and_timed_out_while_the_mesh_serves()
 {
    let m = mesh();
    let n1 = m.lab.node("n1").unwrap().underlay_ip4().to_string();
    let pid = m.nodes[1].pid();
    let idle = "lacewing_listener_timeouts_total{listener=\"tunnel\",phase=\"idle\"}";
    let before = m.metric("n1", idle);
    let baseline = probes(&m, 4);
    // Each probe came over a new tunnel connection: n1 closed the one
    // before it as idle.
    assert!(
        m.metric("n1", idle) - before >= 3.0,
        "probes reused a connection: {}",
        lacewing_tests::node_http(&m.lab, &m.lab.node("n1").unwrap(), "/metrics")
            .lines()
            .filter(|l| l.contains("listener") || l.contains("tunnel"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let rss_before = rss_kb(pid);

    let flood = flood(&m, &n1, 15008);
    let handshakes = "lacewing_listener_handshakes{listener=\"tunnel\"}";
    let held = f64::from(PER_SOURCE_HANDSHAKES + STALLED_EACH * STALLERS.len() as u32);
    poll(
        "n1 holds the flood's handshakes",
        Duration::from_secs(10),
        || (m.metric("n1", handshakes) == held).then_some(()),
    );
    let rss_flooded = rss_kb(pid);
    let during = probes(&m, 4);
    // The flood was still held while the probes ran.
    assert_eq!(m.metric("n1", handshakes), held);
    eprintln!(
        "measured: new mesh connections {baseline:?} ms before, {during:?} ms during the flood; RSS {rss_before} kB -> {rss_flooded} kB"
    );
    assert!(
        median(during.clone()) <= (3.0 * median(baseline.clone())).max(median(baseline) + 20.0),
        "new mesh connections slowed down: {during:?} ms"
    );
    assert!(
        rss_flooded < rss_before + 20 * 1024,
        "the flood cost {} kB",
        rss_flooded - rss_before
    );

    assert_capped_and_timed_out(&outcomes(flood));
    let refused =
        "lacewing_listener_refused_total{listener=\"tunnel\",reason=\"per_source_handshakes\"}";
    assert_eq!(
        m.metric("n1", refused),
        f64::from(IDLE - PER_SOURCE_HANDSHAKES)
    );
    let timeouts = "lacewing_listener_timeouts_total{listener=\"tunnel\",phase=\"handshake\"}";
    assert_eq!(m.metric("n1", timeouts), held);
    assert_eq!(m.metric("n1", handshakes), 0.0);
    assert_eq!(
        m.metric(
            "n1",
            "lacewing_tunnel_handshake_failures_total{reason=\"timeout\"}"
        ),
        held
    );
    // And after it, as before.
    probes(&m, 2);
}

/// hbone.py's line for `mode` against n1:15008.
fn hbone(m: &MeshLab, creds: &Credentials, mode: &[&str]) -> String {
    let n1 = m.lab.node("n1").unwrap().underlay_ip4().to_string();
    m.hbone(&n1, 15008, creds, mode)
}

#[test]
fn bad_bytes_and_bad_requests_on_the_tunnel_port_get_a_clear_refusal_and_the_daemon_serves_on() {
    let m = mesh();
    let creds = m.workload_credentials("spiffe://cluster.local/ns/shop/sa/client");
    let n1 = m.lab.node("n1").unwrap();
    let web = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let healthy = || {
        assert_eq!(m.lab.node_get(&n1, "/healthz").unwrap().trim(), "ok");
    };

    let random = hbone(&m, &creds, &["random"]);
    let after: u64 = field(&random, "after").parse().unwrap();
    assert!(after < 2000, "{random}");
    healthy();
    assert_eq!(
        hbone(&m, &creds, &["http1"]),
        "http1 HTTP/1.1 505 HTTP Version Not Supported"
    );
    healthy();
    assert_eq!(hbone(&m, &creds, &["get"]), "status=405");
    healthy();
    assert_eq!(
        hbone(&m, &creds, &["connect", "10.99.99.99:80"]),
        "status=404"
    );
    healthy();
    // A header list over the 16 KiB limit in one frame: the stream is
    // refused with 431. Spread over CONTINUATION frames far past it, the
    // connection is closed (a flood of CONTINUATION frames is an attack).
    let web = format!("{web}:{PORT}");
    assert_eq!(hbone(&m, &creds, &["connect", &web, "20000"]), "status=431");
    healthy();
    assert_eq!(hbone(&m, &creds, &["connect", &web, "65536"]), "goaway=11");
    healthy();

    for (reason, n) in [
        ("not_http2", 1.0),
        ("not_connect", 1.0),
        ("unknown_destination", 1.0),
    ] {
        let line = format!("lacewing_tunnel_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(m.metric("n1", &line), n, "{line}");
    }
    // The mesh itself never noticed.
    probes(&m, 2);
}

#[test]
fn the_controller_port_caps_and_times_out_a_flood_while_nodes_handshake_as_usual() {
    let m =
        MeshLab::with_controller_args(&["--handshake-timeout", &format!("{HANDSHAKE_TIMEOUT_S}s")]);
    let controller = CONTROLLER_IP.to_string();
    let n0 = m.lab.pki_dir().join("nodes").join("n0");
    let creds = Credentials {
        cert: n0.join("cert.pem"),
        key: n0.join("key.pem"),
        ca: n0.join("ca.pem"),
    };
    let handshake = || -> f64 {
        let line = m.hbone(&controller, 15012, &creds, &["handshake"]);
        field(&line, "handshake_ms").parse().unwrap()
    };
    let baseline = median((0..3).map(|_| handshake()).collect());

    let flood = flood(&m, &controller, 15012);
    let during = median((0..3).map(|_| handshake()).collect());
    eprintln!(
        "measured: a node's handshake with the controller {baseline} ms before, {during} ms during the flood"
    );
    assert!(
        during <= (3.0 * baseline).max(baseline + 20.0),
        "handshakes slowed down: {during} ms against {baseline} ms"
    );
    // A configuration change still reaches the nodes.
    let version = |node: &str| m.metric(node, "lacewing_config_applies_total{result=\"ok\"}");
    let (v0, v1) = (version("n0"), version("n1"));
    m.config(
        "extra.yaml",
        Some("apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: shop}\nspec: {clusterIP: 10.96.0.99, ports: [{name: tcp, port: 80}]}\n"),
    );
    m.until("both nodes applied the change", || {
        version("n0") > v0 && version("n1") > v1
    });

    assert_capped_and_timed_out(&outcomes(flood));
    // A node that finishes its handshake and then says nothing is closed
    // after the same timeout.
    let line = m.hbone(&controller, 15012, &creds, &["silent"]);
    let after: u64 = field(&line, "after").parse().unwrap();
    let timeout_ms = HANDSHAKE_TIMEOUT_S * 1000;
    assert!(
        (timeout_ms - 500..timeout_ms + 2000).contains(&after),
        "a silent connection was closed after {after} ms"
    );
    let value = |line: &str| m.controller_metric(line);
    assert_eq!(
        value("lacewing_listener_timeouts_total{listener=\"controller\",phase=\"header\"}"),
        1.0
    );
    assert_eq!(
        value(
            "lacewing_listener_refused_total{listener=\"controller\",reason=\"per_source_handshakes\"}"
        ),
        f64::from(IDLE - PER_SOURCE_HANDSHAKES)
    );
    assert_eq!(
        value("lacewing_listener_timeouts_total{listener=\"controller\",phase=\"handshake\"}"),
        f64::from(PER_SOURCE_HANDSHAKES + STALLED_EACH * STALLERS.len() as u32)
    );
}

#[test]
fn out_of_files_the_daemon_refuses_the_excess_keeps_its_connections_and_recovers() {
    let mut m = mesh();
    let n1 = m.lab.node("n1").unwrap().underlay_ip4().to_string();
    // A daemon whose log this test reads: n1 taken over by one that logs
    // to logs/n1-1.log.
    let old = m.upgrade_node(
        1,
        &["--handshake-timeout", &format!("{HANDSHAKE_TIMEOUT_S}s")],
    );
    old.wait_with_output().unwrap();
    let pid = m.nodes[1].pid();
    // A conversation that runs through the whole episode.
    let rr = m.spawn_xfer("n0-p0", &["rr", VIP, "80", "hello", "40", "0.25"]);
    poll(
        "the conversation is under way",
        Duration::from_secs(10),
        || {
            (m.metric(
                "n1",
                "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}",
            ) >= 1.0)
                .then_some(())
        },
    );
    // Room for 20 more descriptors than the daemon holds now: the flood's
    // 64 admitted handshakes run it out.
    let limit = (open_files(pid) + 20) as u64;
    let lowered = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit on the daemon this test started; no old value read.
    let rc = unsafe {
        libc::prlimit(
            libc::pid_t::try_from(pid).unwrap(),
            libc::RLIMIT_NOFILE,
            &raw const lowered,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    let mut cmd = Command::new(PYTHON);
    cmd.arg(tool("flood.py"))
        .args([n1.as_str(), "15008"])
        .args(["--from", &format!("{}:200", attacker(200)), "--hold", "40"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    m.lab.add_underlay_address(attacker(200)).unwrap();
    let flood = m.lab.spawn_on_underlay(cmd).unwrap();
    let outcome = outcomes(flood).pop().unwrap().1;
    // 20 got in (and timed out); the rest were reset at once, for the
    // file limit or the cap on one source's handshakes.
    assert_eq!(
        (outcome.opened, outcome.failed, outcome.open),
        (200, 0, 0),
        "{outcome:?}"
    );
    assert!(outcome.later <= 20, "{outcome:?}");
    let file_limit = m.metric(
        "n1",
        "lacewing_listener_refused_total{listener=\"tunnel\",reason=\"file_limit\"}",
    );
    eprintln!(
        "measured: out of files, the flood saw {outcome:?}; {file_limit} refused for the file limit"
    );
    assert!(file_limit >= 1.0, "no refusal for the file limit");
    assert_eq!(
        file_limit + m.metric("n1", "lacewing_listener_refused_total{listener=\"tunnel\",reason=\"per_source_handshakes\"}"),
        f64::from(outcome.at_once)
    );
    let log = fs::read_to_string(m.lab.state_dir().join("logs").join("n1-1.log")).unwrap();
    assert_eq!(
        log.matches("out of descriptors").count(),
        1,
        "logged once per episode"
    );

    // The conversation lost nothing; new connections work again.
    let out = rr.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "replies=40");
    probes(&m, 2);
    assert_eq!(
        m.lab
            .node_get(&m.lab.node("n1").unwrap(), "/healthz")
            .unwrap()
            .trim(),
        "ok"
    );
}
