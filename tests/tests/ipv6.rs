//! IPv6 through the mesh: a meshed pod reaches a v6 Service and a v6 pod on
//! another node through the tunnel (captured by the connect6 hook, carried
//! in mutual TLS 1.3 with the v6 pod address as the CONNECT authority), and
//! STRICT and AuthorizationPolicy hold over v6 as over v4.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)      namespace default
//!   n0-p0 client (sa client)                        n0-p1 plain (not meshed)
//!   n1-p0 web (sa web), n1-p1 web (sa web): xfer.py servers on 9000 (v4 and v6)
//!   Service shop/web6 [fd00:96::20]:80 -> [n1-p0]:9000
//! ```

use std::time::Duration;

use lacewing_tests::mesh_lab::{MeshLab, PORT, field, poll};

/// The v6 Service's ClusterIP (in the default service CIDR fd00:96::/108).
const VIP6: &str = "fd00:96::20";

fn with_v6_service(m: &MeshLab) {
    let web0 = m.lab.pod("n1-p0").unwrap().ip6().to_string();
    m.config(
        "web6.yaml",
        Some(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web6, namespace: shop}}\nspec: {{clusterIP: \"{VIP6}\", ipFamilies: [IPv6], ports: [{{name: tcp, port: 80, targetPort: {PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web6-v6, namespace: shop, labels: {{kubernetes.io/service-name: web6}}}}\naddressType: IPv6\nports: [{{name: tcp, port: {PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{web0}\"]}}]\n"
        )),
    );
    m.until("n0 balances the v6 Service", || {
        m.try_xfer("n0-p0", &["rr", VIP6, "80", "ready", "1"])
            .is_ok_and(|o| o == "replies=1")
    });
}

#[test]
fn a_meshed_pod_moves_100_mib_each_way_over_ipv6_through_the_tunnel_in_tls_1_3_only() {
    // n1 closes a tunnel connection idle for 1 s: the capture below sees a
    // handshake of its own.
    let m = MeshLab::build_with(&[], true, &|_, node| {
        if node.name() == "n1" {
            vec!["--idle-timeout".into(), "1s".into()]
        } else {
            Vec::new()
        }
    });
    with_v6_service(&m);
    let inbound = "lacewing_tunnel_bytes_total{direction=\"inbound\",flow=\"to_destination\"}";
    let before = m.metric("n1", inbound);
    let out = m.xfer("n0-p0", &["bulk", VIP6, "80", "100"]);
    assert_eq!(field(&out, "sent"), (100u64 << 20).to_string(), "{out}");
    assert_eq!(field(&out, "sent"), field(&out, "back"), "{out}");
    assert_eq!(field(&out, "sent_sha"), field(&out, "back_sha"), "{out}");
    assert!(
        m.metric("n1", inbound) - before >= 100.0 * 1024.0 * 1024.0,
        "the bytes did not cross the tunnel"
    );
    // Pod to pod over v6, no Service: captured and carried too.
    let web0 = m.lab.pod("n1-p0").unwrap().ip6().to_string();
    let web1 = m.lab.pod("n1-p1").unwrap().ip6().to_string();
    let streams = "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}";
    let before = m.metric("n1", streams);
    assert_eq!(
        m.xfer("n0-p0", &["rr", &web1, PORT, "pod6", "5"]),
        "replies=5"
    );
    assert_eq!(m.metric("n1", streams) - before, 1.0);
    // Same node over v6 (web-1 to web-0 on n1): no tunnel.
    assert_eq!(
        m.xfer("n1-p1", &["rr", &web0, PORT, "local6", "5"]),
        "replies=5"
    );
    assert_eq!(m.metric("n1", streams) - before, 1.0);

    // On the underlay: no plain text, and TLS 1.3 only.
    let capture = m.capture_underlay("underlay6", 6);
    poll(
        "n1 closed the idle tunnel connection",
        Duration::from_secs(10),
        || {
            (m.metric("n1", "lacewing_listener_connections{listener=\"tunnel\"}") == 0.0)
                .then_some(())
        },
    );
    // The meshed client's marker rides the tunnel (a new connection, with
    // a handshake to see); the plain pod's goes in the clear (which shows
    // the capture sees payloads at all).
    assert_eq!(
        m.xfer("n0-p0", &["rr", VIP6, "80", "LACEWING-V6-MARKER", "20"]),
        "replies=20"
    );
    assert_eq!(
        m.xfer("n0-p1", &["rr", &web0, PORT, "PLAIN-V6-MARKER", "3"]),
        "replies=3"
    );
    let captured = capture.finish();
    assert_eq!(captured.count("frame contains \"LACEWING-V6-MARKER\""), 0);
    assert!(captured.count("frame contains \"PLAIN-V6-MARKER\"") > 0);
    captured.assert_tls13_only();
}

#[test]
fn strict_and_an_authorization_policy_hold_over_ipv6() {
    let m = MeshLab::new();
    with_v6_service(&m);
    let web0 = m.lab.pod("n1-p0").unwrap().ip6().to_string();
    // A deny for the client: its v6 connections are refused, as its v4 ones.
    m.config(
        "deny.yaml",
        Some(
            "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: shop}\nspec: {action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}], to: [{ports: [9000]}]}]}\n",
        ),
    );
    m.until("the deny takes effect over v6", || {
        m.try_xfer("n0-p0", &["rr", VIP6, "80", "denied", "1"])
            .is_err()
    });
    assert!(
        m.try_xfer("n0-p0", &["rr", &web0, PORT, "denied", "1"])
            .is_err()
    );
    let denials = "lacewing_policy_denials_total{policy=\"shop/deny-client\"}";
    assert!(m.metric("n1", denials) >= 2.0);
    m.config("deny.yaml", None);
    m.until("access is restored over v6", || {
        m.try_xfer("n0-p0", &["rr", VIP6, "80", "after", "2"])
            .is_ok_and(|o| o == "replies=2")
    });

    // STRICT: plain text over v6 from outside the mesh is refused; meshed
    // v6 traffic flows.
    assert_eq!(
        m.xfer("n0-p1", &["rr", &web0, PORT, "plain6", "1"]),
        "replies=1"
    );
    m.config(
        "meshconfig.yaml",
        Some("apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {mtlsMode: Strict}\n"),
    );
    m.until("STRICT refuses plain text over v6", || {
        m.try_xfer("n0-p1", &["rr", &web0, PORT, "plain6", "1"])
            .is_err()
    });
    assert_eq!(
        m.xfer("n0-p0", &["rr", VIP6, "80", "mtls6", "3"]),
        "replies=3"
    );
}
