//! The mesh in the lab: meshed pods' outbound TCP is captured by the kernel
//! (no iptables) and carried to other nodes in HBONE over mutual TLS 1.3,
//! authenticated by SPIFFE workload identities.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)      namespace default
//!   n0-p0 client (sa client)                        n0-p1 plain (not meshed)
//!   n1-p0 web (sa web), n1-p1 web (sa web): xfer.py servers on 9000
//!   Service shop/web 10.96.0.20:80 -> n1-p0:9000
//! ```

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use lacewing_tests::{
    bin, map_pin,
    mesh_lab::{MeshLab, PORT, VIP, field, poll},
    node_http, sock_ops_at,
};
use mesh_common::names;

#[test]
fn a_meshed_pod_reaches_a_service_on_another_node_through_the_tunnel() {
    let m = MeshLab::new();
    // 100 MiB each way through the ClusterIP, intact.
    let out = m.xfer("n0-p0", &["bulk", VIP, "80", "100"]);
    assert_eq!(field(&out, "sent"), field(&out, "back"), "{out}");
    assert_eq!(field(&out, "sent_sha"), field(&out, "back_sha"), "{out}");
    // Interactive request/reply.
    let out = m.xfer("n0-p0", &["rr", VIP, "80", "hello", "50"]);
    assert_eq!(out, "replies=50");
    // It went through the tunnel: streams out of n0, into n1, bytes counted.
    let opened = "lacewing_tunnel_streams_opened_total{direction=";
    assert!(m.metric("n0", &format!("{opened}\"outbound\"}}")) >= 2.0);
    assert!(m.metric("n1", &format!("{opened}\"inbound\"}}")) >= 2.0);
    let to_dest = m.metric(
        "n1",
        "lacewing_tunnel_bytes_total{direction=\"inbound\",flow=\"to_destination\"}",
    );
    assert!(to_dest >= 100.0 * 1024.0 * 1024.0, "{to_dest}");
    // Acceleration is on by default: both local hops were spliced (the
    // app and the in-pod listener on n0; the daemon and the pod on n1).
    let added = "lacewing_splice_sockets_added_total{leg=";
    let shown = |node| node_http(&m.lab, &m.lab.node(node).unwrap(), "/metrics");
    assert!(
        m.metric("n0", &format!("{added}\"capture\"}}")) >= 4.0,
        "{}",
        shown("n0")
    );
    assert!(
        m.metric("n1", &format!("{added}\"delivery\"}}")) >= 4.0,
        "{}",
        shown("n1")
    );
    // Both daemons carried it on as many worker threads as configured: the
    // default, or LACEWING_WORKERS (CI runs these tests again with 1).
    let workers: u64 = std::env::var(lacewing_node::config::ENV_WORKERS)
        .map_or(lacewing_node::config::DEFAULT_WORKERS as u64, |w| {
            w.parse().expect("LACEWING_WORKERS is a count")
        });
    for node in ["n0", "n1"] {
        let status = node_http(&m.lab, &m.lab.node(node).unwrap(), "/status");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["workers"], workers, "{status}");
    }
    // The two connections went to n0's workers in turn, and each worker
    // keeps its own tunnel connection to n1: one handshake per worker used,
    // however many streams (as many on n1's side).
    let connections = "lacewing_tunnel_connections_opened_total{direction=";
    let used = workers.min(2) as f64;
    assert_eq!(
        m.metric("n0", &format!("{connections}\"outbound\"}}")),
        used
    );
    assert_eq!(m.metric("n1", &format!("{connections}\"inbound\"}}")), used);
}

#[test]
fn nothing_crosses_the_underlay_in_plain_text_and_only_tls_1_3_is_offered() {
    let m = MeshLab::new();
    let capture = m.capture_underlay("underlay", 8);
    // The meshed client's marker goes through the tunnel; the plain pod's
    // goes in the clear (which shows the capture sees payloads at all).
    let out = m.xfer("n0-p0", &["rr", VIP, "80", "LACEWING-SECRET-MARKER", "20"]);
    assert_eq!(out, "replies=20");
    let web1 = m.lab.pod("n1-p1").unwrap().ip4().to_string();
    let out = m.xfer("n0-p1", &["rr", &web1, PORT, "PLAIN-VISIBLE-MARKER", "5"]);
    assert_eq!(out, "replies=5");
    let captured = capture.finish();
    assert_eq!(
        captured.count("frame contains \"LACEWING-SECRET-MARKER\""),
        0
    );
    assert!(captured.count("frame contains \"PLAIN-VISIBLE-MARKER\"") > 0);
    // Every TLS handshake on the underlay negotiated TLS 1.3.
    captured.assert_tls13_only();

    // What the tunnel port offers: TLS 1.3 and nothing older.
    let node1 = m.lab.node("n1").unwrap().underlay_ip4().to_string();
    let mut sslscan = Command::new("sslscan");
    sslscan.args(["--no-colour", "--no-heartbleed", &format!("{node1}:15008")]);
    let scan = m.lab.run_on_underlay(sslscan).unwrap();
    let scan = String::from_utf8_lossy(&scan.stdout).into_owned();
    for old in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2"] {
        assert!(
            scan.lines()
                .any(|l| l.starts_with(old) && l.contains("disabled")),
            "{old} must be disabled:\n{scan}"
        );
    }
    assert!(
        scan.lines()
            .any(|l| l.starts_with("TLSv1.3") && l.contains("enabled")),
        "{scan}"
    );
    assert!(
        !scan
            .lines()
            .any(|l| l.contains("Accepted") && !l.contains("TLSv1.3")),
        "only TLS 1.3 suites may be accepted:\n{scan}"
    );
}

#[test]
fn an_authorization_policy_deny_closes_the_connection_until_it_is_removed() {
    let m = MeshLab::new();
    assert_eq!(
        m.xfer("n0-p0", &["rr", VIP, "80", "before", "3"]),
        "replies=3"
    );
    m.config(
        "deny.yaml",
        Some(
            "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: shop}\nspec: {action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}], to: [{ports: [9000]}]}]}\n",
        ),
    );
    m.until("the deny takes effect", || {
        m.try_xfer("n0-p0", &["rr", VIP, "80", "denied", "1"])
            .is_err()
    });
    let denials = "lacewing_policy_denials_total{policy=\"shop/deny-client\"}";
    assert!(m.metric("n1", denials) >= 1.0);
    // The same-node path enforces the same policy: web-1 (sa web) may call
    // web-0 on n1; the policy names only the client.
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    assert_eq!(
        m.xfer("n1-p1", &["rr", &web0, PORT, "same-node", "3"]),
        "replies=3"
    );
    // A pod outside the mesh is untouched by capture and policy.
    assert_eq!(
        m.xfer("n0-p1", &["rr", &web0, PORT, "plain", "3"]),
        "replies=3"
    );
    // Removing the policy restores access.
    m.config("deny.yaml", None);
    m.until("access is restored", || {
        m.try_xfer("n0-p0", &["rr", VIP, "80", "after", "3"])
            .is_ok_and(|out| out == "replies=3")
    });
}

#[test]
fn strict_refuses_plain_text_to_meshed_pods_and_permissive_accepts_it() {
    let m = MeshLab::new();
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let web0_v6 = m.lab.pod("n1-p0").unwrap().ip6().to_string();
    // No MeshConfig: PERMISSIVE, plain text from outside the mesh is accepted.
    assert_eq!(
        m.xfer("n0-p1", &["rr", &web0, PORT, "plain", "2"]),
        "replies=2"
    );
    let mesh_config = |body: &str| {
        format!(
            "apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default}}\nspec: {body}\n"
        )
    };
    m.config("meshconfig.yaml", Some(&mesh_config("{mtlsMode: Strict}")));
    m.until("STRICT refuses plain text", || {
        m.try_xfer("n0-p1", &["rr", &web0, PORT, "plain", "1"])
            .is_err()
    });
    assert!(
        m.try_xfer("n0-p1", &["rr", &web0_v6, PORT, "plain6", "1"])
            .is_err(),
        "IPv6 too"
    );
    let refused = "lacewing_tunnel_refused_total{reason=\"plaintext_strict\"}";
    assert!(m.metric("n1", refused) >= 2.0);
    // Meshed traffic still flows, across nodes and on the same node.
    assert_eq!(
        m.xfer("n0-p0", &["rr", VIP, "80", "mtls", "3"]),
        "replies=3"
    );
    assert_eq!(
        m.xfer("n1-p1", &["rr", &web0, PORT, "local", "3"]),
        "replies=3"
    );
    // A per-namespace override to PERMISSIVE accepts plain text again.
    m.config(
        "meshconfig.yaml",
        Some(&mesh_config(
            "{mtlsMode: Strict, namespaces: [{namespace: shop, mtlsMode: Permissive}]}",
        )),
    );
    m.until("PERMISSIVE accepts plain text", || {
        m.try_xfer("n0-p1", &["rr", &web0, PORT, "plain", "1"])
            .is_ok_and(|out| out == "replies=1")
    });
}

#[test]
fn a_long_lived_connection_survives_three_certificate_rotations() {
    // 4-second certificates, renewed every 2 seconds.
    let m = MeshLab::with_controller_args(&["--workload-cert-ttl", "4s"]);
    // One connection, 60 round trips a quarter second apart (15 s).
    let rr = m.spawn_xfer("n0-p0", &["rr", VIP, "80", "long-lived", "60", "0.25"]);
    let mut serials = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(12);
    while serials.len() < 4 && Instant::now() < deadline {
        serials.extend(m.serial("n0", "spiffe://cluster.local/ns/shop/sa/client"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(serials.len() >= 4, "rotations seen: {serials:?}");
    let out = rr.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "replies=60");
}

#[test]
fn killing_the_destination_mid_stream_resets_the_client() {
    let mut m = MeshLab::new();
    // A transfer far longer than the test.
    let mut bulk = m.spawn_xfer("n0-p0", &["bulk", VIP, "80", "100000"]);
    let inbound = "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}";
    poll("the transfer reaches n1", Duration::from_secs(10), || {
        (m.metric("n1", inbound) >= 1.0).then_some(())
    });
    assert!(
        bulk.try_wait().unwrap().is_none(),
        "the transfer is under way"
    );
    m.servers[0].terminate(Duration::ZERO).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = bulk.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the client hangs after its peer died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = bulk.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "the transfer cannot have completed");
    assert!(
        err.contains("ConnectionResetError") || err.contains("BrokenPipeError"),
        "the client's connection is reset: {err}"
    );
}

#[test]
fn the_tunnel_rejects_foreign_expired_and_mismatched_certificates() {
    use lacewing_core::pki::{self, Ca};
    let m = MeshLab::new();
    let dir = m.lab.state_dir().join("probe");
    fs::create_dir_all(&dir).unwrap();
    let lab_ca = Ca::load_or_create(&m.lab.pki_dir().join("ca")).unwrap();
    let foreign_ca = Ca::load_or_create(&dir.join("foreign-ca")).unwrap();
    let issue = |name: &str, ca: &Ca, identity: &str, ttl: u64| {
        let (key, csr) = pki::new_key_and_csr(identity).unwrap();
        let cert = ca
            .sign_csr(&csr, identity, Duration::from_secs(ttl))
            .unwrap();
        fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
        fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
        name.to_owned()
    };
    let client = "spiffe://cluster.local/ns/shop/sa/client";
    let good = issue("good", &lab_ca, client, 3600);
    let foreign = issue("foreign", &foreign_ca, client, 3600);
    let expired = issue("expired", &lab_ca, client, 1);
    let impostor = issue(
        "impostor",
        &lab_ca,
        "spiffe://cluster.local/ns/shop/sa/admin",
        3600,
    );
    // Wait (by the clock, not by a guess) until the 1 s certificate is past.
    // Validity is checked in whole seconds (`now > notAfter`, both
    // truncated), so expired means a full second after notAfter.
    let expired_at = pki::not_after(&fs::read_to_string(dir.join("expired.pem")).unwrap()).unwrap();
    while std::time::SystemTime::now() <= expired_at + Duration::from_millis(1100) {
        std::thread::sleep(Duration::from_millis(50));
    }

    let node1 = format!("{}:15008", m.lab.node("n1").unwrap().underlay_ip4());
    let web0 = format!("{}:{PORT}", m.lab.pod("n1-p0").unwrap().ip4());
    let source = m.lab.pod("n0-p0").unwrap().ip4().to_string();
    let ca = m.lab.pki_dir().join("ca").join("ca.pem");
    let probe = |name: &str| {
        let mut cmd = Command::new(bin("lacewing"));
        cmd.arg("tunnel-probe")
            .arg("--cert")
            .arg(dir.join(format!("{name}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{name}-key.pem")))
            .arg("--ca")
            .arg(&ca)
            .args([
                "--node-addr",
                &node1,
                "--node",
                "n1",
                "--to",
                &web0,
                "--source",
                &source,
            ]);
        let out = m.lab.run_on_underlay(cmd).unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // The control: the client's identity, from the client's address.
    let (ok, text) = probe(&good);
    assert!(ok && text.trim() == "probe", "{text}");
    let failures = |reason: &str| {
        m.metric(
            "n1",
            &format!("lacewing_tunnel_handshake_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    // Each is refused for its own reason, and counted under it (the server
    // counts once its handshake task ends, a moment after the client sees
    // the connection close).
    // The foreign CA's name carries its own key's tag, so no root of the
    // mesh is its issuer.
    for (name, reason) in [(&foreign, "unknown_issuer"), (&expired, "expired")] {
        let before = failures(reason);
        let (ok, text) = probe(name);
        assert!(!ok, "the {name} certificate must be rejected: {text}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while failures(reason) < before + 1.0 {
            let shown = node_http(&m.lab, &m.lab.node("n1").unwrap(), "/metrics");
            assert!(
                Instant::now() < deadline,
                "the {name} certificate is not counted as {reason}: {text}\n{}",
                shown
                    .lines()
                    .filter(|l| l.starts_with("lacewing_tunnel_handshake_failures"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(failures(reason), before + 1.0, "counted once");
    }
    // A valid certificate whose identity is not the source pod's.
    let mismatch = "lacewing_tunnel_refused_total{reason=\"identity_mismatch\"}";
    let before = m.metric("n1", mismatch);
    let (ok, text) = probe(&impostor);
    assert!(!ok && text.contains("403"), "{text}");
    assert_eq!(m.metric("n1", mismatch), before + 1.0);
}

// Same-node acceleration: web-1 and web-0 are both meshed on n1. By default
// a call between them takes the kernel fast path (straight from pod to pod,
// the two sockets spliced through LW_SPLICE). With the fast path off it
// takes two local hops through the daemon (web-1's app to the in-pod
// listener; the daemon to web-0), each spliced.

#[test]
fn same_node_pods_talk_through_the_kernel_fast_path() {
    let m = MeshLab::new();
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let baseline = m.spliced_sockets("n1");
    let (allowed, capture) = (
        m.decisions("n1", "kernel", "allowed"),
        m.added("n1", "capture"),
    );
    let out = m.xfer("n1-p1", &["bulk", &web0, PORT, "100"]);
    assert_eq!(field(&out, "sent"), field(&out, "back"), "{out}");
    assert_eq!(field(&out, "sent_sha"), field(&out, "back_sha"), "{out}");
    assert_eq!(
        m.xfer("n1-p1", &["rr", &web0, PORT, "direct", "50"]),
        "replies=50"
    );
    // Decided in the kernel; the daemon not involved (nothing captured).
    assert_eq!(m.decisions("n1", "kernel", "allowed") - allowed, 2.0);
    assert_eq!(m.added("n1", "capture"), capture);
    // A pod off the node is not for the fast path: counted, to the daemon.
    let client_to_web = m.decisions("n0", "daemon", "destination_not_meshed_here");
    assert_eq!(
        m.xfer("n0-p0", &["rr", VIP, "80", "remote", "1"]),
        "replies=1"
    );
    assert_eq!(
        m.decisions("n0", "daemon", "destination_not_meshed_here") - client_to_web,
        1.0
    );
    assert_eq!(m.spliced_sockets("n1"), baseline);
}

#[test]
fn a_policy_deny_between_same_node_pods_is_enforced_in_the_kernel() {
    let m = MeshLab::new();
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    assert_eq!(
        m.xfer("n1-p1", &["rr", &web0, PORT, "before", "1"]),
        "replies=1"
    );
    m.config(
        "deny-web.yaml",
        Some(
            "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-web, namespace: shop}\nspec: {action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]}]}\n",
        ),
    );
    let denied = m.decisions("n1", "kernel", "denied");
    m.until("the deny reaches the kernel", || {
        m.try_xfer("n1-p1", &["rr", &web0, PORT, "denied", "1"])
            .is_err_and(|e| e.contains("ConnectionRefused"))
    });
    // Refused at connect, by the kernel, counted; the daemon saw nothing.
    assert!(m.decisions("n1", "kernel", "denied") > denied);
    m.config("deny-web.yaml", None);
    m.until("removing the policy restores access", || {
        m.try_xfer("n1-p1", &["rr", &web0, PORT, "after", "1"])
            .is_ok_and(|out| out == "replies=1")
    });
}

#[test]
fn daemon_hops_are_spliced_and_carry_bytes_intact() {
    let m = MeshLab::new();
    m.switch_acceleration("n1", "on", "off");
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let baseline = m.spliced_sockets("n1");
    let (capture, delivery) = (m.added("n1", "capture"), m.added("n1", "delivery"));
    // 100 MiB each way; the client half-closes and the echo ends with the
    // server's close, so both propagate across the spliced hops.
    let out = m.xfer("n1-p1", &["bulk", &web0, PORT, "100"]);
    assert_eq!(field(&out, "sent"), field(&out, "back"), "{out}");
    assert_eq!(field(&out, "sent_sha"), field(&out, "back_sha"), "{out}");
    // While a connection is open its four sockets are in the map.
    let rr = m.spawn_xfer("n1-p1", &["rr", &web0, PORT, "held", "30", "0.1"]);
    m.until("the held connection's sockets are spliced", || {
        m.spliced_sockets("n1") == baseline + 4
    });
    let out = rr.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "replies=30");
    // Both hops of both connections were spliced: two sockets each.
    assert_eq!(m.added("n1", "capture") - capture, 4.0);
    assert_eq!(m.added("n1", "delivery") - delivery, 4.0);
    m.until("closed sockets leave the map", || {
        m.spliced_sockets("n1") == baseline
    });
}

#[test]
fn ten_thousand_concurrent_connections_leave_no_stale_splice_entries() {
    let m = MeshLab::new();
    // n0-p0 to n1-p0 through the tunnel: each connection's capture leg is
    // spliced on n0 and its delivery leg on n1, 10,000 of them at once in
    // one tunnel connection. (Across nodes, so each daemon holds one
    // socket per connection: this machine caps a process at 20,000 files.)
    let _echo = m.serve_tool("n1-p0", "many.py", &["serve", "9001"], 9001);
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let baseline = (m.spliced_sockets("n0"), m.spliced_sockets("n1"));
    let (capture, delivery) = (m.added("n0", "capture"), m.added("n1", "delivery"));
    let out = m.run_tool("n0-p0", "many.py", &["open", &web0, "9001", "10000"]);
    assert_eq!(out, "open=10000 echoed=10000");
    assert_eq!(m.added("n0", "capture") - capture, 20000.0);
    assert_eq!(m.added("n1", "delivery") - delivery, 20000.0);
    assert_eq!(m.added("n0", "map_full") + m.added("n1", "map_full"), 0.0);
    // All closed: the kernel dropped every entry with its socket.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = (m.spliced_sockets("n0"), m.spliced_sockets("n1"));
        if now == baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{now:?} entries in the splice maps of n0 and n1, {baseline:?} before"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sendfile_and_splice_work_across_spliced_hops() {
    let m = MeshLab::new();
    let file = m.lab.state_dir().join("payload.bin");
    let payload: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i * 7 + i / 4099) as u8)
        .collect();
    fs::write(&file, &payload).unwrap();
    let file = file.to_str().unwrap();
    let sum = Command::new("sha256sum").arg(file).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    let expected = format!("{} {}", payload.len(), sum.split(' ').next().unwrap());
    let _server = m.serve_tool("n1-p0", "zerocopy.py", &["serve", "9002", file], 9002);
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    // Through the daemon: the client's writes (put) and the server's
    // (get) are spliced into it.
    m.switch_acceleration("n1", "on", "off");
    let (capture, delivery) = (m.added("n1", "capture"), m.added("n1", "delivery"));
    // The server sends with sendfile, the client reads with splice.
    assert_eq!(
        m.run_tool("n1-p1", "zerocopy.py", &["get", &web0, "9002"]),
        expected
    );
    // The client sends with sendfile, half-closes, and blocks in recv for
    // the server's answer (read with splice).
    assert_eq!(
        m.run_tool("n1-p1", "zerocopy.py", &["put", &web0, "9002", file]),
        expected
    );
    assert_eq!(m.added("n1", "capture") - capture, 4.0);
    assert_eq!(m.added("n1", "delivery") - delivery, 4.0);
}

#[test]
fn acceleration_turns_off_and_on_under_traffic_without_losing_a_connection() {
    let m = MeshLab::new();
    // Through the daemon, whose hops are spliced.
    m.switch_acceleration("n1", "on", "off");
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    // Two long conversations started with acceleration on (spliced) ...
    let opened = |m: &MeshLab| m.metric("n1", "lacewing_connections_opened_total");
    let before = opened(&m);
    let spliced = m.spawn_xfer("n1-p1", &["rr", &web0, PORT, "on-then-off", "60", "0.05"]);
    let bulk = m.spawn_xfer("n1-p1", &["bulk", &web0, PORT, "200"]);
    poll(
        "both connections are carried",
        Duration::from_secs(10),
        || (opened(&m) >= before + 2.0).then_some(()),
    );
    m.switch_acceleration("n1", "off", "off");
    assert_eq!(m.metric("n1", "lacewing_acceleration_enabled"), 0.0);
    // ... and one started while it is off (not spliced).
    let capture = m.added("n1", "capture");
    let before = opened(&m);
    let plain = m.spawn_xfer("n1-p1", &["rr", &web0, PORT, "off-then-on", "60", "0.05"]);
    poll(
        "the new connection is carried",
        Duration::from_secs(10),
        || (opened(&m) >= before + 1.0).then_some(()),
    );
    assert_eq!(
        m.added("n1", "capture"),
        capture,
        "nothing spliced while off"
    );
    // The spliced conversation wrote the usual way while off: marked so it
    // is never moved again.
    let off_marks = || m.map_entries("n1", &map_pin(names::MAP_SPLICE_OFF, 0));
    poll(
        "the spliced sender is marked off",
        Duration::from_secs(5),
        || (off_marks() >= 1).then_some(()),
    );
    m.switch_acceleration("n1", "on", "off");
    for (name, p) in [("spliced", spliced), ("plain", plain)] {
        let out = p.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "replies=60",
            "{name}: {out:?}"
        );
    }
    let out = bulk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bulk: {out:?}");
    assert_eq!(field(&text, "sent_sha"), field(&text, "back_sha"), "{text}");
    // On again: new connections are spliced.
    assert_eq!(
        m.xfer("n1-p1", &["rr", &web0, PORT, "again", "2"]),
        "replies=2"
    );
    assert!(m.added("n1", "capture") >= capture + 2.0);
    // Each mark goes with its sender's connection.
    poll("no sender is marked off", Duration::from_secs(5), || {
        (off_marks() == 0).then_some(())
    });
}

#[test]
fn a_fast_writer_into_a_spliced_hop_cannot_make_the_kernel_queue_without_bound() {
    let m = MeshLab::new();
    let mut iperf = Command::new("iperf3");
    iperf.args(["-s", "-p", "5201"]);
    let mut server = m
        .lab
        .spawn_in_pod(&m.lab.pod("n1-p0").unwrap(), iperf)
        .unwrap();
    server
        .wait_listening(5201, Duration::from_secs(10))
        .unwrap();
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    // The client writes far faster than the tunnel carries: its writes are
    // spliced into the daemon's socket, where no TCP window stops it.
    let sampler = std::thread::spawn(|| {
        let mut most = 0u64;
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(300));
            let stat = fs::read_to_string("/proc/net/sockstat").unwrap();
            // `TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1`: pages in use.
            let pages = stat
                .lines()
                .find(|l| l.starts_with("TCP:"))
                .and_then(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    let at = fields.iter().position(|f| *f == "mem")?;
                    fields.get(at + 1)?.parse::<u64>().ok()
                })
                .unwrap_or_else(|| panic!("no TCP memory in /proc/net/sockstat:\n{stat}"));
            most = most.max(pages);
        }
        most
    });
    let mut client = Command::new("iperf3");
    client.args(["-c", &web0, "-p", "5201", "-t", "4"]);
    let out = m
        .lab
        .run_in_pod(&m.lab.pod("n0-p0").unwrap(), client)
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let most_pages = sampler.join().unwrap();
    // The daemon fell behind and switched the writer back to TCP, whose
    // window then bounds the queue: the machine's TCP memory stays in the
    // tens of megabytes (unbounded, it passed a gigabyte in 3 s).
    assert!(m.metric("n0", "lacewing_splice_writers_switched_off_total") >= 1.0);
    assert!(
        most_pages * 4096 < 256 << 20,
        "TCP memory reached {} MiB",
        (most_pages * 4096) >> 20
    );
}

// sock_ops runs only where the mesh serves sockets: at the node daemon's
// cgroup and at each captured pod's, not at the node's. The kernel calls a
// sock_ops program for every TCP socket below it (9 calls for a connection
// with both ends on the node), so an unmeshed pod now pays none. A pod that
// joins the mesh gets its link before capture starts; one that leaves
// loses it.
#[test]
fn sock_ops_runs_only_at_the_daemons_and_the_captured_pods_cgroups() {
    let m = MeshLab::new();
    let n0 = m.lab.topology().nodes().next().unwrap();
    let client = m.lab.pod("n0-p0").unwrap();
    let plain = m.lab.pod("n0-p1").unwrap();
    assert_eq!(sock_ops_at(&m.lab.daemon_cgroup(&n0), false), 1);
    assert_eq!(sock_ops_at(&m.lab.pod_cgroup(&client), false), 1);
    assert_eq!(sock_ops_at(&m.lab.node_cgroup(&n0), false), 0);
    assert_eq!(sock_ops_at(&m.lab.pod_cgroup(&plain), true), 0);
    let pins = || {
        let links = lacewing_node::loader::links_dir(&m.lab.node_bpffs_root(&n0));
        let mut names: Vec<String> = fs::read_dir(links)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("lw_sockops"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(pins().len(), 2, "{:?}", pins());
    // The meshed client is still captured and served.
    let captured = m.added("n0", "capture");
    assert_eq!(
        m.xfer("n0-p0", &["rr", VIP, "80", "scoped", "3"]),
        "replies=3"
    );
    assert!(m.added("n0", "capture") > captured);

    // The plain pod's namespace joins the mesh: its cgroup gets the link.
    m.config(
        "mesh-default.yaml",
        Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {lacewing.io/mesh: enabled}}\n"),
    );
    m.until("the joining pod's cgroup has sock_ops", || {
        sock_ops_at(&m.lab.pod_cgroup(&plain), true) == 1
    });
    assert_eq!(pins().len(), 3, "{:?}", pins());
    m.config("mesh-default.yaml", None);
    m.until("the leaving pod's link is gone", || {
        sock_ops_at(&m.lab.pod_cgroup(&plain), true) == 0
    });
    assert_eq!(pins().len(), 2, "{:?}", pins());
}
