//! Workload identities in the lab: the controller signs a certificate only
//! for a pod scheduled on the asking node; each node holds one for every
//! meshed pod's identity on it and renews it at half its lifetime.
//!
//! ```text
//!   lacewing-controller --workload-cert-ttl 4s   (underlay, 10.200.0.254)
//!   n0: shop/api (sa default), default/client     n1: shop/web (sa web)
//!   namespace shop is labelled lacewing.io/mesh=enabled
//! ```

use std::{
    collections::BTreeSet,
    fs,
    process::Command,
    time::{Duration, Instant},
};

use lacewing::lab::{Lab, LabProcess};
use lacewing_tests::{assert_promtool_accepts, bin, new_lab, node_http, start_subscribed_nodes};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/default";

struct IdentityLab {
    lab: Lab,
    _controller: LabProcess,
    _nodes: Vec<LabProcess>,
}

impl IdentityLab {
    fn new() -> Self {
        let lab = new_lab(2, 1);
        let folder = lab.state_dir().join("config");
        fs::create_dir_all(&folder).unwrap();
        let ip = |pod: &str| lab.pod(pod).unwrap().ip4().to_string();
        let pod = |ns: &str, name: &str, sa: &str, node: &str, ip: String| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{phase: Running, podIP: \"{ip}\"}}\n"
            )
        };
        let yaml = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {lacewing.io/mesh: enabled}}\n".to_owned(),
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n".to_owned(),
            pod("shop", "web", "web", "n1", ip("n1-p0")),
            pod("shop", "api", "default", "n0", ip("n0-p0")),
            pod("default", "client", "default", "n0", "10.244.0.99".into()),
        ]
        .join("---\n");
        fs::write(folder.join("pods.yaml"), yaml).unwrap();
        let controller = lab
            .start_controller_with(
                &bin("lacewing-controller"),
                &folder,
                &["--workload-cert-ttl", "4s"],
            )
            .unwrap();
        let nodes = start_subscribed_nodes(&lab, false);
        Self {
            lab,
            _controller: controller,
            _nodes: nodes,
        }
    }

    /// The certificates node `node` holds: (identity, serial).
    fn certificates(&self, node: &str) -> Vec<(String, String)> {
        let status = node_http(&self.lab, &self.lab.node(node).unwrap(), "/status");
        let json: serde_json::Value = serde_json::from_str(&status).unwrap();
        json["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["identity"].as_str().unwrap_or_default().to_owned(),
                    c["serial"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn identities_until(&self, node: &str, want: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<String> = self.certificates(node).into_iter().map(|c| c.0).collect();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{node}: want {want:?}, holds {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `lacewing cert-request` with `node`'s credentials, on the underlay.
    fn request(&self, node: &str, pod: &str, identity: &str) -> (bool, String) {
        let tls = self
            .lab
            .node_credentials(&self.lab.node(node).unwrap())
            .unwrap();
        let mut cmd = Command::new(bin("lacewing"));
        cmd.args(["cert-request", "--controller", &self.lab.controller_url()])
            .arg("--tls-dir")
            .arg(tls)
            .args(["--pod", pod, "--identity", identity]);
        let out = self.lab.run_on_underlay(cmd).unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

#[test]
fn each_node_holds_certificates_for_its_meshed_pods_and_renews_them() {
    let l = IdentityLab::new();
    // Only meshed pods, only the node's own; default/client is not meshed.
    l.identities_until("n1", &[WEB]);
    l.identities_until("n0", &[API]);

    // 4 s certificates are renewed about every 2 s: three renewals in 10 s.
    let mut serials = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while serials.len() < 4 {
        assert!(Instant::now() < deadline, "renewals seen: {serials:?}");
        serials.extend(l.certificates("n1").into_iter().map(|c| c.1));
        std::thread::sleep(Duration::from_millis(200));
    }

    // The expiry is exported per identity, and the exposition is valid.
    let metrics = node_http(&l.lab, &l.lab.node("n1").unwrap(), "/metrics");
    let line = format!("lacewing_certificate_expiry_timestamp_seconds{{identity=\"{WEB}\"}}");
    assert!(metrics.contains(&line), "{metrics}");
    assert_promtool_accepts(&metrics);
}

#[test]
fn a_node_gets_only_the_identities_of_its_own_pods() {
    let l = IdentityLab::new();
    l.identities_until("n1", &[WEB]);
    // n0 asks for n1's pod: refused, and says why.
    let (ok, text) = l.request("n0", "shop/web", WEB);
    assert!(
        !ok && text.contains("pod shop/web is not scheduled on node n0"),
        "{text}"
    );
    // n1 asks for it: signed.
    let (ok, text) = l.request("n1", "shop/web", WEB);
    assert!(ok && text.contains(&format!("issued {WEB}")), "{text}");
    // n0 asks for its own pod but another identity: refused.
    let (ok, text) = l.request("n0", "shop/api", WEB);
    assert!(
        !ok && text.contains(&format!("the identity it may have is {API}")),
        "{text}"
    );
}
