//! Certificates with real lifetimes: node certificates of a few seconds,
//! renewed by the running daemons at half life, while a long-lived
//! cross-node connection keeps flowing; the tunnel port serves each new
//! certificate at once, and the controller channel reconnects with it.
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
    time::{Duration, Instant},
};

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

#[test]
fn node_certificates_of_seconds_are_renewed_while_a_long_connection_flows() {
    let ttl = format!("{TTL_S}s");
    let mut m = MeshLab::build_with(&["--node-cert-ttl", &ttl], true, &|lab, node| {
        // Each daemon starts with a certificate of the same short life.
        let ca = pki::Ca::load_or_create(&lab.pki_dir().join("ca")).unwrap();
        ca.issue_node_for(
            &lab.pki_dir().join("nodes").join(node.name()),
            pki::DEFAULT_TRUST_DOMAIN,
            &node.name(),
            Duration::from_secs(TTL_S),
        )
        .unwrap();
        Vec::new()
    });
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
