//! The node daemon's connections over its life and the policy's: a drain on
//! SIGTERM lets an established transfer finish, a policy that starts
//! denying a source closes its established connection (through the daemon,
//! or straight through the kernel's fast path), and a new pod's
//! first connection waits for its certificate.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)
//!   n0-p0 client (sa client)        n0-p1 late (sa late, added by a test)
//!   n1-p0 web (sa web), n1-p1 web (sa web): xfer.py servers on 9000
//!   Service shop/web 10.96.0.20:80 -> n1-p0:9000
//!   the controller on the underlay (10.200.0.254:15012)
//! ```

use mesh_common::names;
use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use lacewing_tests::{
    mesh_lab::{MeshLab, PORT, VIP, field, pod, poll},
    node_http,
};

#[test]
fn a_transfer_in_flight_when_the_destination_daemon_gets_sigterm_completes_and_it_exits_0() {
    let mut m = MeshLab::new();
    // 100 MiB at 25 MiB/s: four seconds on the wire, each way.
    let bulk = m.spawn_xfer("n0-p0", &["bulk", VIP, "80", "100", "25"]);
    let inbound = "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}";
    poll(
        "the transfer is under way through n1",
        Duration::from_secs(10),
        || (m.metric("n1", inbound) >= 1.0).then_some(()),
    );
    // Bytes are still moving when n1 is told to stop.
    std::thread::sleep(Duration::from_millis(500));
    m.nodes[1].signal(libc::SIGTERM).unwrap();
    let signalled = Instant::now();
    // The default drain timeout is 30 s.
    let status = poll("lacewing-node on n1 exits", Duration::from_secs(35), || {
        m.nodes[1].try_wait().unwrap()
    });
    assert_eq!(
        status.code(),
        Some(0),
        "lacewing-node exits 0 after draining"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(30),
        "within the drain timeout"
    );
    MeshLab::assert_bulk_intact(bulk, 100);
}

/// The configuration version `node` has applied.
fn applied_version(m: &MeshLab, node: &str) -> u64 {
    let status = node_http(&m.lab, &m.lab.node(node).unwrap(), "/status");
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    json["version"].as_u64().unwrap()
}

/// Writes `policy` (denying `principal`, in namespace shop) and asserts
/// that `rr`'s connection fails (with one of the Python `errors`) within a
/// second of `node` applying it, and is counted there as one denial by the
/// policy.
fn deny_closes_within_a_second(
    m: &MeshLab,
    node: &str,
    mut rr: lacewing::lab::LabProcess,
    policy: &str,
    principal: &str,
    errors: &[&str],
) {
    let before = applied_version(m, node);
    m.config(
        &format!("{policy}.yaml"),
        Some(&format!(
            "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {policy}, namespace: shop}}\nspec: {{action: Deny, rules: [{{from: [{{principals: [\"{principal}\"]}}]}}]}}\n"
        )),
    );
    // When the node applies the policy, and when the connection ends.
    let mut applied = None;
    let ended = poll(
        "the client's connection ends",
        Duration::from_secs(10),
        || {
            if applied.is_none() && applied_version(m, node) != before {
                applied = Some(Instant::now());
            }
            rr.try_wait()
                .unwrap()
                .map(|status| (status, Instant::now()))
        },
    );
    // The policy did reach the node (a connection ending for another
    // reason would not do); seen at the latest when the connection ended.
    assert_ne!(
        applied_version(m, node),
        before,
        "{node} never applied the policy"
    );
    let applied = applied.unwrap_or(ended.1);
    assert!(
        ended.1.saturating_duration_since(applied) < Duration::from_secs(1),
        "closed {:?} after {node} applied the policy",
        ended.1.saturating_duration_since(applied)
    );
    let out = rr.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !ended.0.success(),
        "the connection cannot have finished its 300 round trips"
    );
    assert!(
        errors.iter().any(|e| err.contains(e)),
        "the client's connection fails with one of {errors:?}: {err}"
    );
    let denials = format!("lacewing_policy_denials_total{{policy=\"shop/{policy}\"}}");
    assert_eq!(
        m.metric(node, &denials),
        1.0,
        "the one closed connection is counted"
    );
}

#[test]
fn an_established_connection_is_closed_within_a_second_of_a_deny_naming_its_source() {
    let m = MeshLab::new();
    // One connection, a round trip every 0.1 s for 30 s.
    let rr = m.spawn_xfer("n0-p0", &["rr", VIP, "80", "long-lived", "300", "0.1"]);
    let inbound = "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}";
    poll("the connection reaches n1", Duration::from_secs(10), || {
        (m.metric("n1", inbound) >= 1.0).then_some(())
    });
    deny_closes_within_a_second(
        &m,
        "n1",
        rr,
        "deny-client",
        "spiffe://cluster.local/ns/shop/sa/client",
        // The daemon resets the client's connection.
        &["ConnectionResetError", "BrokenPipeError"],
    );
}

#[test]
fn a_fast_path_connection_is_closed_within_a_second_of_a_deny_naming_its_source() {
    let m = MeshLab::new();
    // n1-p1 to n1-p0, both on n1: the kernel lets it straight through, so
    // the daemon never holds it.
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let allowed = m.decisions("n1", "kernel", "allowed");
    let rr = m.spawn_xfer("n1-p1", &["rr", &web0, PORT, "long-lived", "300", "0.1"]);
    poll(
        "the connection takes the fast path",
        Duration::from_secs(10),
        || (m.decisions("n1", "kernel", "allowed") > allowed).then_some(()),
    );
    assert_eq!(
        m.metric("n1", "lacewing_connections_open "),
        0.0,
        "no connection through the daemon"
    );
    deny_closes_within_a_second(
        &m,
        "n1",
        rr,
        "deny-web",
        "spiffe://cluster.local/ns/shop/sa/web",
        // The kernel aborts the client's own socket (as `ss -K` does).
        &["ConnectionAbortedError"],
    );
}

#[test]
fn a_new_pods_first_connection_waits_for_its_certificate_instead_of_being_reset() {
    let m = MeshLab::build(&[], false);
    let n0 = m.lab.node("n0").unwrap();
    // New connections from n0 to the controller are refused, so the
    // certificate of the new pod cannot be issued yet; the configuration
    // stream (established) goes on.
    let nft = |script: &str| {
        let file = m.lab.state_dir().join("hold.nft");
        fs::write(&file, script).unwrap();
        let mut cmd = Command::new("nft");
        cmd.arg("-f").arg(&file);
        let out = m.lab.run_on_node(&n0, cmd).unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    nft(
        "table inet lwhold {\n  chain out {\n    type filter hook output priority 0;\n    tcp dport 15012 ct state new reject with tcp reset\n  }\n}\n",
    );
    let late = m.lab.pod("n0-p1").unwrap();
    m.config(
        "late.yaml",
        Some(
            &[
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: late, namespace: shop}\n"
                    .to_owned(),
                pod(
                    "shop",
                    "late",
                    "late",
                    "n0",
                    [late.ip4().to_string(), late.ip6().to_string()],
                ),
            ]
            .join("---\n"),
        ),
    );
    // n0 captures the new pod, and has tried and failed to get its
    // certificate.
    poll("n0 captures the new pod", Duration::from_secs(10), || {
        (m.metric("n0", "lacewing_captured_pods") == 2.0).then_some(())
    });
    let failed = "lacewing_certificate_requests_total{result=\"error\"}";
    poll(
        "n0's certificate request is refused",
        Duration::from_secs(10),
        || (m.metric("n0", failed) >= 1.0).then_some(()),
    );
    let outbound = "lacewing_tunnel_streams_opened_total{direction=\"outbound\"}";
    let opened_before = m.metric("n0", outbound);
    // The pod's first connection, while it has no certificate.
    let rr = m.spawn_xfer("n0-p1", &["rr", VIP, "80", "first", "3"]);
    std::thread::sleep(Duration::from_millis(1500));
    let late_id = "spiffe://cluster.local/ns/shop/sa/late";
    assert!(m.serial("n0", late_id).is_none(), "no certificate yet");
    nft("delete table inet lwhold");
    let out = rr.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "replies=3",
        "the first connection succeeds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(m.serial("n0", late_id).is_some());
    assert_eq!(
        m.metric("n0", outbound),
        opened_before + 1.0,
        "it went through the tunnel"
    );
}

#[test]
fn after_a_sigkill_captured_connects_fail_fast_the_kernel_keeps_balancing_and_a_new_daemon_serves_within_a_second()
 {
    let mut m = MeshLab::new();
    assert_eq!(
        field(
            &m.xfer("n0-p0", &["rr", VIP, "80", "before", "3"]),
            "replies"
        ),
        "3"
    );
    let service_maps = [names::MAP_SERVICES, names::MAP_BACKENDS, names::MAP_SLOTS]
        .map(|map| lacewing_tests::map_pin(map, 0));
    let before: Vec<String> = service_maps
        .iter()
        .map(|map| m.map_dump("n0", map))
        .collect();
    // A pod outside the mesh opens a new connection to the Service, one
    // after the other, all through the daemon's death and the next one's
    // start: the kernel balances every one of them.
    let loop_script = format!(
        "ok=0; for i in $(seq 300); do {python} {xfer} rr {VIP} 80 plain 1 >/dev/null && ok=$((ok+1)); done; echo ok=$ok",
        python = lacewing_tests::PYTHON,
        xfer = lacewing_tests::tool("xfer.py").display(),
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &loop_script])
        .stdout(std::process::Stdio::piped());
    let mut plain = m
        .lab
        .spawn_in_pod(&m.lab.pod("n0-p1").unwrap(), cmd)
        .unwrap();
    // And the meshed pod opens a new connection for each request, 100 a
    // second, through the same gap.
    let csv = m.lab.state_dir().join("churn.csv");
    let churn = {
        let mut cmd = Command::new(lacewing_tests::PYTHON);
        cmd.arg(lacewing_tests::tool("churn.py"))
            .args([VIP, "80", "100", "8"])
            .arg(&csv)
            .stdout(std::process::Stdio::piped());
        m.lab
            .spawn_in_pod(&m.lab.pod("n0-p0").unwrap(), cmd)
            .unwrap()
    };
    std::thread::sleep(Duration::from_secs(1));
    // SIGKILL: nothing runs on n0's side of the mesh; the pins stay.
    let n0 = m.nodes.remove(0);
    n0.signal(libc::SIGKILL).unwrap();
    let mut n0 = n0;
    poll("n0's daemon is gone", Duration::from_secs(5), || {
        n0.try_wait().unwrap().map(|_| ())
    });
    // A meshed pod's connect fails at once (its capture listener is gone),
    // it does not hang.
    let asked = Instant::now();
    let gap = m.try_xfer("n0-p0", &["rr", VIP, "80", "gap", "1"]);
    assert!(gap.is_err(), "a captured connect with no daemon: {gap:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "failed after {:?}, not at once: {gap:?}",
        asked.elapsed()
    );
    // A pod outside the mesh is balanced by the kernel as before.
    for _ in 0..5 {
        assert_eq!(
            field(
                &m.xfer("n0-p1", &["rr", VIP, "80", "plain", "1"]),
                "replies"
            ),
            "1"
        );
    }
    // A new daemon takes the pinned datapath over without flushing it and
    // serves the meshed pod again within a second of starting.
    let node = m.lab.node("n0").unwrap();
    let args = lacewing_tests::subscribed_node_args(&m.lab, &node, true);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let started = Instant::now();
    let daemon = m
        .lab
        .start_node_daemon_with(&node, &lacewing_tests::bin("lacewing-node"), &args)
        .unwrap();
    m.nodes.insert(0, daemon);
    let served = poll(
        "n0 serves its meshed pod again",
        Duration::from_secs(10),
        || {
            m.try_xfer("n0-p0", &["rr", VIP, "80", "after", "1"])
                .ok()
                .map(|_| started.elapsed())
        },
    );
    eprintln!("measured: n0-p0 served {served:?} after the new daemon was started");
    assert!(
        plain.try_wait().unwrap().is_none(),
        "the unmeshed pod's connections must span the whole gap"
    );
    assert!(served < Duration::from_secs(1), "served after {served:?}");
    let after: Vec<String> = service_maps
        .iter()
        .map(|map| m.map_dump("n0", map))
        .collect();
    assert_eq!(before, after, "the service maps were rewritten");
    let out = plain.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok=300",
        "every connection of the pod outside the mesh, through the gap"
    );
    // The meshed pod's requests: each one that failed did so at once (its
    // connect refused, or its connection reset or closed by the kill),
    // none hung;
    // from a second after the new daemon started, every one succeeded.
    let out = churn.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let since_start = wall_clock(started);
    let rows = fs::read_to_string(&csv).unwrap();
    let (mut failed, mut after) = (0, 0);
    for row in rows.lines() {
        let cols: Vec<&str> = row.split(',').collect();
        let (at, latency_us, outcome) = (
            cols[0].parse::<f64>().unwrap(),
            cols[1].parse::<u64>().unwrap(),
            cols[2],
        );
        if outcome == "ok" {
            after += usize::from(at > since_start + 1.0);
            continue;
        }
        failed += 1;
        assert!(
            matches!(outcome, "refused" | "resets" | "closed"),
            "a request during the gap {outcome} after {latency_us} us: {summary}"
        );
        assert!(
            latency_us < 1_000_000,
            "failed after {latency_us} us, not at once"
        );
        assert!(
            at < since_start + 1.0,
            "a request {:.3} s after the new daemon started failed ({outcome}): {summary}",
            at - since_start
        );
    }
    assert!(failed > 0, "the gap was under load: {summary}");
    assert!(after > 100, "the load went on after the restart: {summary}");
    eprintln!("measured: meshed requests through the crash: {summary}");
}

/// The wall-clock time (seconds since the epoch) of an `Instant` past.
fn wall_clock(at: Instant) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    now - at.elapsed().as_secs_f64()
}

#[test]
fn a_daemon_restarted_after_a_sigkill_into_a_new_map_layout_moves_the_services_to_it() {
    let mut m = MeshLab::new();
    let (old_pin, new_pin) = (
        lacewing_tests::map_pin(names::MAP_SERVICES, 0),
        lacewing_tests::map_pin(names::MAP_SERVICES, 1),
    );
    let before = m.map_dump("n0", &old_pin);
    let n0 = m.nodes.remove(0);
    n0.signal(libc::SIGKILL).unwrap();
    let mut n0 = n0;
    poll("n0's daemon is gone", Duration::from_secs(5), || {
        n0.try_wait().unwrap().map(|_| ())
    });
    let node = m.lab.node("n0").unwrap();
    let mut args = lacewing_tests::subscribed_node_args(&m.lab, &node, true);
    args.extend(["--layout-bump".into(), "1".into()]);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let daemon = m
        .lab
        .start_node_daemon_with(&node, &lacewing_tests::bin("lacewing-node"), &args)
        .unwrap();
    m.nodes.insert(0, daemon);
    // The old layout's pin goes only once the programs use the new maps,
    // which hold what the old ones held.
    let maps = m.lab.node_bpffs_root(&node).join("maps");
    poll(
        "the old layout's maps are removed",
        Duration::from_secs(10),
        || (!maps.join(&old_pin).exists()).then_some(()),
    );
    assert_eq!(m.map_dump("n0", &new_pin), before);
    assert_eq!(
        field(
            &m.xfer("n0-p0", &["rr", VIP, "80", "after", "3"]),
            "replies"
        ),
        "3"
    );
    assert_eq!(
        field(
            &m.xfer("n0-p1", &["rr", VIP, "80", "plain", "3"]),
            "replies"
        ),
        "3",
        "the kernel balances on the new layout's maps"
    );
}
