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

use lacewing::lab::{Lab, LabProcess};
use lacewing_tests::{PYTHON, bin, new_lab, node_http, start_subscribed_nodes, tool};

const VIP: &str = "10.96.0.20";
const PORT: &str = "9000";

struct MeshLab {
    lab: Lab,
    _controller: LabProcess,
    _nodes: Vec<LabProcess>,
    servers: Vec<LabProcess>,
}

fn pod(ns: &str, name: &str, sa: &str, node: &str, ips: [String; 2]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
        ips[0], ips[1]
    )
}

impl MeshLab {
    fn new() -> Self {
        Self::with_controller_args(&[])
    }

    fn with_controller_args(controller_args: &[&str]) -> Self {
        let lab = new_lab(2, 2);
        let folder = lab.state_dir().join("config");
        fs::create_dir_all(&folder).unwrap();
        let ips = |p: &str| {
            let p = lab.pod(p).unwrap();
            [p.ip4().to_string(), p.ip6().to_string()]
        };
        let docs = [
            lab.nodes_yaml(),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {lacewing.io/mesh: enabled}}\n".into(),
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n".into(),
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: client, namespace: shop}\n".into(),
            pod("shop", "client", "client", "n0", ips("n0-p0")),
            pod("default", "plain", "default", "n0", ips("n0-p1")),
            pod("shop", "web-0", "web", "n1", ips("n1-p0")),
            pod("shop", "web-1", "web", "n1", ips("n1-p1")),
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: {VIP}, ports: [{{name: tcp, port: 80, targetPort: {PORT}}}]}}\n"),
            format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-v4, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: tcp, port: {PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n", ips("n1-p0")[0]),
        ];
        fs::write(folder.join("mesh.yaml"), docs.join("---\n")).unwrap();
        let controller = lab
            .start_controller_with(&bin("lacewing-controller"), &folder, controller_args)
            .unwrap();
        let servers = ["n1-p0", "n1-p1"]
            .iter()
            .map(|p| {
                let mut cmd = Command::new(PYTHON);
                cmd.arg(tool("xfer.py")).args(["serve", PORT]);
                let mut s = lab.spawn_in_pod(&lab.pod(p).unwrap(), cmd).unwrap();
                s.wait_listening(9000, Duration::from_secs(10)).unwrap();
                s
            })
            .collect();
        let nodes = start_subscribed_nodes(&lab, true);
        let m = Self {
            lab,
            _controller: controller,
            _nodes: nodes,
            servers,
        };
        m.wait_for_certificate("n0", "spiffe://cluster.local/ns/shop/sa/client");
        m.wait_for_certificate("n1", "spiffe://cluster.local/ns/shop/sa/web");
        m
    }

    fn wait_for_certificate(&self, node: &str, identity: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = node_http(&self.lab, &self.lab.node(node).unwrap(), "/status");
            if status.contains(identity) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{node} has no certificate for {identity}:\n{status}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// xfer.py started in `pod`, in the background.
    fn spawn_xfer(&self, pod: &str, args: &[&str]) -> LabProcess {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(tool("xfer.py"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.lab
            .spawn_in_pod(&self.lab.pod(pod).unwrap(), cmd)
            .unwrap()
    }

    /// Serials of `node`'s certificate for `identity` seen so far.
    fn serial(&self, node: &str, identity: &str) -> Option<String> {
        let status = node_http(&self.lab, &self.lab.node(node).unwrap(), "/status");
        let json: serde_json::Value = serde_json::from_str(&status).ok()?;
        json["certificates"]
            .as_array()?
            .iter()
            .find(|c| c["identity"] == identity)
            .and_then(|c| c["serial"].as_str().map(str::to_owned))
    }

    fn xfer(&self, pod: &str, args: &[&str]) -> String {
        self.try_xfer(pod, args)
            .unwrap_or_else(|err| panic!("xfer.py {args:?} in {pod}: {err}"))
    }

    /// xfer.py's output, or its error.
    fn try_xfer(&self, pod: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(tool("xfer.py")).args(args);
        let out = self
            .lab
            .run_in_pod(&self.lab.pod(pod).unwrap(), cmd)
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Writes (or with `None` removes) a file of the controller's folder.
    fn config(&self, file: &str, yaml: Option<&str>) {
        let path = self.lab.state_dir().join("config").join(file);
        match yaml {
            Some(yaml) => {
                let tmp = path.with_extension("tmp");
                fs::write(&tmp, yaml).unwrap();
                fs::rename(tmp, path).unwrap();
            }
            None => fs::remove_file(path).unwrap(),
        }
    }

    /// Retries `f` until it returns true.
    fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn metric(&self, node: &str, line_start: &str) -> f64 {
        let metrics = node_http(&self.lab, &self.lab.node(node).unwrap(), "/metrics");
        metrics
            .lines()
            .filter(|l| l.starts_with(line_start))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in `{text}`"))
}

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
}

#[test]
fn nothing_crosses_the_underlay_in_plain_text_and_only_tls_1_3_is_offered() {
    let m = MeshLab::new();
    let pcap = m.lab.state_dir().join("underlay.pcap");
    let mut tshark = Command::new("tshark");
    tshark
        .args(["-q", "-i", "br0", "-a", "duration:8", "-w"])
        .arg(&pcap)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let capture = m.lab.spawn_on_underlay(tshark).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // The meshed client's marker goes through the tunnel; the plain pod's
    // goes in the clear (which shows the capture sees payloads at all).
    let out = m.xfer("n0-p0", &["rr", VIP, "80", "LACEWING-SECRET-MARKER", "20"]);
    assert_eq!(out, "replies=20");
    let web1 = m.lab.pod("n1-p1").unwrap().ip4().to_string();
    let out = m.xfer("n0-p1", &["rr", &web1, PORT, "PLAIN-VISIBLE-MARKER", "5"]);
    assert_eq!(out, "replies=5");
    let done = capture.wait_with_output().unwrap();
    assert!(done.status.success(), "tshark: {done:?}");

    let count = |filter: &str| {
        let out = Command::new("tshark")
            .args(["-r"])
            .arg(&pcap)
            .args(["-Y", filter])
            .output()
            .unwrap();
        assert!(out.status.success(), "tshark -Y {filter}: {out:?}");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(count("frame contains \"LACEWING-SECRET-MARKER\""), 0);
    assert!(count("frame contains \"PLAIN-VISIBLE-MARKER\"") > 0);
    // Every TLS handshake on the underlay negotiated TLS 1.3.
    let hellos = count("tls.handshake.type == 2");
    assert!(hellos > 0, "no TLS handshake captured");
    assert_eq!(
        count("tls.handshake.type == 2 && tls.handshake.extensions.supported_version == 0x0304"),
        hellos
    );

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
            .is_ok()
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
            .is_ok()
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
    std::thread::sleep(Duration::from_secs(1));
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
    use lacewing::pki::{self, Ca};
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
    std::thread::sleep(Duration::from_millis(2100));

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
    for (name, why) in [(&foreign, "another CA"), (&expired, "expired")] {
        let (ok, text) = probe(name);
        assert!(!ok, "a certificate from {why} must be rejected: {text}");
    }
    // A valid certificate whose identity is not the source pod's.
    let (ok, text) = probe(&impostor);
    assert!(!ok && text.contains("403"), "{text}");
    let failures = m.metric("n1", "lacewing_tunnel_handshake_failures_total");
    assert!(failures >= 2.0, "handshake failures counted: {failures}");
    let mismatch = "lacewing_tunnel_refused_total{reason=\"identity_mismatch\"}";
    assert!(m.metric("n1", mismatch) >= 1.0);
}
