//! Certificates with real lifetimes: node certificates of a few seconds,
//! renewed by the running daemons at half life, while a long-lived
//! cross-node connection keeps flowing; the tunnel port serves each new
//! certificate at once, and the controller channel reconnects with it.
//! And a rotation of the CA itself (`lacewing ca prepare`, `activate`,
//! `finish`) under traffic, after which the old root is refused.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)
//!   n0-p0 client (sa client)
//!   n1-p0 web (sa web), n1-p1 web (sa web): xfer.py servers on 9000
//!   Service shop/web 10.96.0.20:80 -> n1-p0:9000
//!   the controller on the underlay, signing node certificates for 8 s
//! ```

use std::{
    collections::BTreeSet,
    fs,
    process::{Command, Output},
    time::{Duration, Instant},
};

use lacewing::lab::Lab;
use lacewing_core::pki;
use lacewing_tests::mesh_lab::{Credentials, MeshLab, VIP, field, poll};

/// Node certificate lifetime here (renewed every 4 s).
const TTL_S: u64 = 8;

/// hbone.py's handshake with n1's tunnel port: the serial and remaining
/// seconds of the certificate it serves.
fn tunnel_certificate(m: &MeshLab, creds: &Credentials) -> (String, i64) {
    let n1 = m.lab.node("n1").unwrap().underlay_ip4().to_string();
    let line = m.hbone(&n1, 15008, creds, &["handshake"]);
    (
        field(&line, "serial").to_owned(),
        field(&line, "expires_in_s").parse().unwrap(),
    )
}

/// Each daemon starts with a certificate of [`TTL_S`].
fn short_node_certificate(lab: &Lab, node: &lacewing::lab::NodeSpec) -> Vec<String> {
    let ca = pki::Ca::load_or_create(&lab.pki_dir().join("ca")).unwrap();
    ca.issue_node_for(
        &lab.pki_dir().join("nodes").join(node.name()),
        pki::DEFAULT_TRUST_DOMAIN,
        &node.name(),
        Duration::from_secs(TTL_S),
    )
    .unwrap();
    Vec::new()
}

#[test]
fn node_certificates_of_seconds_are_renewed_while_a_long_connection_flows() {
    let ttl = format!("{TTL_S}s");
    let mut m = MeshLab::build_with(&["--node-cert-ttl", &ttl], true, &short_node_certificate);
    let started = Instant::now();
    // A conversation of 20 s: one connection, one tunnel stream.
    let rr = m.spawn_xfer("n0-p0", &["rr", VIP, "80", "long", "80", "0.25"]);

    // A client of the tunnel port outside the daemons, with a workload
    // certificate from the mesh CA.
    let creds = m.workload_credentials("spiffe://cluster.local/ns/shop/sa/client");

    // Each daemon renews several times; the tunnel port serves each new
    // certificate, never one older than its lifetime.
    let mut serials = BTreeSet::new();
    let renewals = "lacewing_node_certificate_renewals_total{result=\"ok\"}";
    poll("n1 renewed three times", Duration::from_secs(40), || {
        let (serial, left) = tunnel_certificate(&m, &creds);
        assert!(
            (0..=TTL_S as i64 + 60).contains(&left),
            "the tunnel serves a certificate with {left} s left"
        );
        serials.insert(serial);
        std::thread::sleep(Duration::from_millis(500));
        (m.metric("n1", renewals) >= 3.0).then_some(())
    });
    assert!(serials.len() >= 3, "the tunnel served {serials:?}");
    poll("n0 renewed three times", Duration::from_secs(20), || {
        (m.metric("n0", renewals) >= 3.0).then_some(())
    });
    // The files the next daemon (and the controller channel) read are the
    // renewed ones: each certificate in --tls-dir is younger than its TTL.
    for node in ["n0", "n1"] {
        let (_, cert, _) =
            pki::read_credentials(&m.lab.pki_dir().join("nodes").join(node)).unwrap();
        let (from, to) = pki::validity(&cert).unwrap();
        assert_eq!(to.duration_since(from).unwrap().as_secs(), TTL_S + 60);
        assert!(
            to > std::time::SystemTime::now(),
            "{node}'s certificate expired"
        );
    }

    // The first certificates expired long ago: a controller started now
    // accepts the nodes only with the renewed ones they reconnect with.
    assert!(started.elapsed() > Duration::from_secs(TTL_S));
    m.restart_controller();
    let applied = |node: &str| m.metric(node, "lacewing_config_applies_total{result=\"ok\"}");
    let (a0, a1) = (applied("n0"), applied("n1"));
    m.config(
        "extra.yaml",
        Some("apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: shop}\nspec: {clusterIP: 10.96.0.99, ports: [{name: tcp, port: 80}]}\n"),
    );
    poll(
        "both nodes took a change from the new controller",
        Duration::from_secs(30),
        || (applied("n0") > a0 && applied("n1") > a1).then_some(()),
    );

    // The conversation went on across every renewal.
    let out = rr.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "replies=80");
    assert_eq!(
        m.metric(
            "n1",
            "lacewing_node_certificate_renewals_total{result=\"error\"}"
        ),
        0.0
    );
}

/// `lacewing ca <step>` on the lab's CA folder.
fn ca_step(m: &MeshLab, step: &str) -> Output {
    Command::new(lacewing_tests::bin("lacewing"))
        .args(["ca", step, "--pki-dir"])
        .arg(m.lab.pki_dir())
        .output()
        .unwrap()
}

/// The CA in the lab's folder now, read as a copy that notes nothing
/// (certificates the test makes for itself must not hold a rotation up).
fn ca_now(m: &MeshLab) -> pki::Ca {
    let dir = m.lab.pki_dir().join("ca");
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
    pki::Ca::from_pem(&read(pki::CA_FILE), &read(pki::CA_KEY_FILE)).unwrap()
}

/// What n1's tunnel port makes of `creds` (hbone.py's handshake line).
fn n1_handshake(m: &MeshLab, creds: &Credentials) -> String {
    let n1 = m.lab.node("n1").unwrap().underlay_ip4().to_string();
    m.hbone(&n1, 15008, creds, &["handshake"])
}

fn assert_accepted(m: &MeshLab, creds: &Credentials) {
    let line = n1_handshake(m, creds);
    assert!(line.ends_with("client=accepted"), "{line}");
}

#[test]
fn the_ca_rotates_under_traffic_and_its_old_root_is_refused_after() {
    let ttl = format!("{TTL_S}s");
    let m = MeshLab::build_with(
        &["--node-cert-ttl", &ttl, "--workload-cert-ttl", &ttl],
        true,
        &short_node_certificate,
    );
    let client = "spiffe://cluster.local/ns/shop/sa/client";
    let old = ca_now(&m);
    let roots = |node: &str| m.metric(node, "lacewing_node_trust_bundle_roots");
    let all_roots = || {
        [
            roots("n0"),
            roots("n1"),
            m.controller_metric("lacewing_ca_trust_bundle_roots"),
        ]
    };
    assert_eq!(all_roots(), [1.0; 3]);

    // Traffic through the whole rotation: a 40 s conversation on one
    // connection, and a new connection every 50 ms, each one a request
    // and its answer, all from n0 to the service on n1.
    let rr = m.spawn_xfer("n0-p0", &["rr", VIP, "80", "long", "160", "0.25"]);
    let churn = {
        let mut cmd = Command::new(lacewing_tests::PYTHON);
        cmd.arg(lacewing_tests::tool("churn.py"))
            .args([VIP, "80", "20", "40"])
            .stdout(std::process::Stdio::piped());
        m.lab
            .spawn_in_pod(&m.lab.pod("n0-p0").unwrap(), cmd)
            .unwrap()
    };
    let old_client = m.credentials_signed_by(&old, client, old.pem(), "old");
    assert_accepted(&m, &old_client);

    // 1. The next root is trusted everywhere before it signs anything.
    let out = ca_step(&m, "prepare");
    assert!(out.status.success(), "{out:?}");
    poll(
        "every node and the controller trust 2 roots",
        Duration::from_secs(20),
        || (all_roots() == [2.0; 3]).then_some(()),
    );
    assert_accepted(&m, &old_client);

    // 2. It signs: n1's tunnel port soon serves a certificate that a
    // client trusting only the new root accepts.
    let out = ca_step(&m, "activate");
    assert!(out.status.success(), "{out:?}");
    let new = ca_now(&m);
    assert_ne!(new.fingerprint(), old.fingerprint());
    let new_client = m.credentials_signed_by(&new, client, new.pem(), "new");
    poll(
        "n1 serves a certificate from the new root",
        Duration::from_secs(20),
        || {
            n1_handshake(&m, &new_client)
                .ends_with("client=accepted")
                .then_some(())
        },
    );

    // 3. Refused while a certificate from the old root may still be in
    // use, then done once they have all expired.
    let early = ca_step(&m, "finish");
    assert!(!early.status.success(), "finished too early: {early:?}");
    let said = String::from_utf8_lossy(&early.stderr);
    assert!(
        said.contains(&format!(
            "root {} signed certificates valid for",
            old.fingerprint()
        )),
        "{said}"
    );
    poll("the old root may go", Duration::from_secs(30), || {
        ca_step(&m, "finish").status.success().then_some(())
    });
    poll(
        "every node and the controller trust 1 root",
        Duration::from_secs(20),
        || (all_roots() == [1.0; 3]).then_some(()),
    );

    // After: a certificate from the old root, fresh and in its validity,
    // is refused; the same from the new root is taken.
    let stale = m.credentials_signed_by(&old, client, new.pem(), "stale");
    let line = n1_handshake(&m, &stale);
    assert!(field(&line, "client").starts_with("rejected:"), "{line}");
    assert_accepted(&m, &new_client);
    // And a client trusting only the old root no longer trusts the node.
    assert!(
        n1_handshake(&m, &old_client).starts_with("untrusted_server="),
        "n1 still serves a certificate from the old root"
    );

    // Not one request failed on the way.
    let out = rr.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "replies=160");
    let out = churn.wait_with_output().unwrap();
    let counts = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let requests: u32 = field(&counts, "requests").parse().unwrap();
    assert!(requests >= 700, "{counts}");
    assert_eq!(
        counts,
        format!("requests={requests} ok={requests} refused=0 resets=0 closed=0 timeouts=0 other=0")
    );
    for node in ["n0", "n1"] {
        assert_eq!(
            m.metric(
                node,
                "lacewing_node_certificate_renewals_total{result=\"error\"}"
            ),
            0.0
        );
    }
}

/// Minutes since the epoch of testssl's `YYYY-MM-DD HH:MM` (UTC).
fn minutes(stamp: &str) -> i64 {
    let n: Vec<i64> = stamp
        .split(['-', ' ', ':'])
        .map(|p| {
            p.parse()
                .unwrap_or_else(|_| panic!("testssl's time `{stamp}`"))
        })
        .collect();
    let [y, m, d, hh, mm] = n[..] else {
        panic!("testssl's time `{stamp}`");
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 24 + hh) * 60 + mm
}

#[test]
fn testssl_finds_tls_1_3_only_and_the_certificate_lifetime_configured() {
    // The controller signs node certificates for 2 hours; each daemon
    // starts with an 8-second one and soon renews into that.
    let m = MeshLab::build_with(&["--node-cert-ttl", "2h"], true, &short_node_certificate);
    poll(
        "n1 renewed its certificate",
        Duration::from_secs(30),
        || {
            (m.metric(
                "n1",
                "lacewing_node_certificate_renewals_total{result=\"ok\"}",
            ) >= 1.0)
                .then_some(())
        },
    );
    let n1 = m.lab.node("n1").unwrap().underlay_ip4().to_string();
    let json = m.lab.state_dir().join("testssl.json");
    let mut cmd = Command::new("testssl");
    cmd.args([
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        "--ip",
        "one",
        "-p",
        "-S",
        "--jsonfile",
    ])
    .arg(&json)
    .arg(format!("{n1}:15008"));
    let out = m.lab.run_on_node(&m.lab.node("n0").unwrap(), cmd).unwrap();
    let report: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&json).unwrap_or_else(|e| panic!("no testssl report ({e}): {out:?}")),
    )
    .unwrap();
    let finding = |id: &str| -> String {
        report
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["finding"].as_str())
            .unwrap_or_else(|| panic!("testssl reported no {id}: {report}"))
            .to_owned()
    };
    eprintln!(
        "measured: testssl TLS1_2={:?} TLS1_3={:?} cert_notBefore={:?} cert_notAfter={:?}",
        finding("TLS1_2"),
        finding("TLS1_3"),
        finding("cert_notBefore"),
        finding("cert_notAfter")
    );
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"] {
        assert!(
            finding(old).starts_with("not offered"),
            "{old}: {}",
            finding(old)
        );
    }
    assert!(
        finding("TLS1_3").starts_with("offered"),
        "{}",
        finding("TLS1_3")
    );
    // Two hours from a minute before it was issued (clock skew).
    let lifetime = minutes(&finding("cert_notAfter")) - minutes(&finding("cert_notBefore"));
    assert_eq!(
        lifetime,
        121,
        "{} to {}",
        finding("cert_notBefore"),
        finding("cert_notAfter")
    );
}
