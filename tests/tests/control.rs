//! The control plane in the lab: lacewing-controller on the underlay serving
//! a folder of YAML, lacewing-node on every node subscribed to it.
//!
//! ```text
//!        lacewing-controller 10.200.0.254:15012 (folder: <lab>/config)
//!                 |  gRPC: versioned deltas, ACK/NACK
//!        +--------+---------+
//!   n0 lacewing-node   n1 lacewing-node
//!   n0-p0 (client)     n1-p0, n1-p1 (backends, port 7000)
//! ```

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    fs,
    net::IpAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use lacewing::lab::{Lab, LabProcess};
use lacewing_tests::{
    ServiceYaml, assert_promtool_accepts, bin, new_lab, node_http, probe, start_backend,
};

const TARGET: u16 = 7000;
const VIP: &str = "10.96.0.10";

struct ControlLab {
    lab: Lab,
    folder: PathBuf,
    controller: Option<LabProcess>,
    _nodes: Vec<LabProcess>,
    _backends: Vec<LabProcess>,
}

impl ControlLab {
    /// `extra[i]`: more flags for node i's daemon.
    fn new(extra: [&[&str]; 2]) -> Self {
        Self::with_certificates(extra, ["n0", "n1"])
    }

    /// `certs[i]`: whose certificate node i's daemon presents.
    fn with_certificates(extra: [&[&str]; 2], certs: [&str; 2]) -> Self {
        let lab = new_lab(2, 2);
        let folder = lab.state_dir().join("config");
        fs::create_dir_all(&folder).unwrap();
        let controller = lab
            .start_controller(&bin("lacewing-controller"), &folder)
            .unwrap();
        let url = lab.controller_url();
        // Each certificate issued once, before any daemon reads it (issuing
        // again rewrites the folder under a daemon that is reading it).
        let issued: std::collections::BTreeMap<&str, std::path::PathBuf> = certs
            .iter()
            .map(|c| (*c, lab.node_credentials(&lab.node(c).unwrap()).unwrap()))
            .collect();
        let nodes = ["n0", "n1"]
            .iter()
            .zip(extra)
            .zip(certs)
            .map(|((n, extra), cert)| {
                let tls = &issued[cert];
                let mut args: Vec<&OsStr> = vec![
                    OsStr::new("--controller"),
                    OsStr::new(&url),
                    OsStr::new("--tls-dir"),
                    tls.as_os_str(),
                ];
                args.extend(extra.iter().map(OsStr::new));
                lab.start_node_daemon_with(&lab.node(n).unwrap(), &bin("lacewing-node"), &args)
                    .unwrap()
            })
            .collect();
        let backends = ["n1-p0", "n1-p1"]
            .iter()
            .map(|p| start_backend(&lab, &lab.pod(p).unwrap(), TARGET))
            .collect();
        Self {
            lab,
            folder,
            controller: Some(controller),
            _nodes: nodes,
            _backends: backends,
        }
    }

    fn ip4(&self, pod: &str) -> IpAddr {
        IpAddr::V4(self.lab.pod(pod).unwrap().ip4())
    }

    fn write(
        &self,
        file: &str,
        name: &str,
        vip: &str,
        backends: &[IpAddr],
        annotations: &[(&str, String)],
    ) {
        let yaml = ServiceYaml {
            name,
            cluster_ips: &[vip.parse().unwrap()],
            target: TARGET,
            backends,
            annotations,
            affinity_timeout_s: None,
        }
        .render();
        // Write then rename, as a config tool would: the controller never
        // reads half a file.
        let tmp = self.folder.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).unwrap();
        fs::rename(tmp, self.folder.join(file)).unwrap();
    }

    /// Backends that answered 20 TCP connects to `vip` from `pod`, or the errors.
    fn reached(&self, pod: &str, vip: &str) -> Result<BTreeSet<String>, String> {
        let p = probe(
            &self.lab,
            &self.lab.pod(pod).unwrap(),
            "tcp",
            vip.parse().unwrap(),
            80,
            "20",
        );
        if p.errors.is_empty() {
            Ok(p.replies.into_keys().collect())
        } else {
            Err(format!("{:?}", p.errors))
        }
    }

    /// Waits until every client pod on both nodes gets `expected` from `vip`.
    fn converge(&self, vip: &str, expected: Result<&[&str], &str>, within: Duration) {
        let deadline = Instant::now() + within;
        let want = expected.map(|e| e.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
        loop {
            let got: Vec<_> = ["n0-p0", "n0-p1"]
                .iter()
                .map(|p| self.reached(p, vip))
                .collect();
            let ok = got.iter().all(|g| match (&want, g) {
                (Ok(w), Ok(g)) => w == g,
                (Err(e), Err(g)) => g.contains(e),
                _ => false,
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{vip}: wanted {want:?} from n0-p0 and n0-p1, got {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `lacewing status` run on the underlay, where the controller is.
    /// The sum of the controller's metric lines that start with `line_start`.
    fn controller_metric(&self, line_start: &str) -> f64 {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5"]).arg(format!(
            "http://{}/metrics",
            self.lab.controller_status_addr()
        ));
        let out = self.lab.run_on_underlay(cmd).unwrap();
        assert!(out.status.success(), "controller /metrics: {out:?}");
        lacewing_tests::metric_sum(&String::from_utf8_lossy(&out.stdout), line_start)
    }

    /// `lacewing status` until `f` holds for it (10 s at most).
    fn status_until(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status();
            if f(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "timed out: {what}:\n{status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&self) -> String {
        let mut cmd = Command::new(bin("lacewing"));
        cmd.args(["status", "--controller", &self.lab.controller_status_addr()]);
        let out = self.lab.run_on_underlay(cmd).unwrap();
        assert!(out.status.success(), "lacewing status: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn services_in_the_folder_reach_every_node_and_follow_changes() {
    let c = ControlLab::new([&[], &[]]);
    c.write("web.yaml", "web", VIP, &[c.ip4("n1-p0")], &[]);
    c.converge(VIP, Ok(&["n1-p0"]), Duration::from_secs(10));
    // The client on n1 (the backend's own node) is balanced by n1's daemon.
    assert_eq!(
        c.reached("n1-p0", VIP),
        Ok(BTreeSet::from(["n1-p0".to_owned()]))
    );
    // Changing the endpoint moves the traffic.
    c.write("web.yaml", "web", VIP, &[c.ip4("n1-p1")], &[]);
    c.converge(VIP, Ok(&["n1-p1"]), Duration::from_secs(10));
    let status = c.status();
    assert!(
        status.matches("in sync").count() == 2 && status.contains("connected"),
        "{status}"
    );
    // The controller's metrics name every node's applied version, and pass
    // Prometheus' own checker.
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        &format!("http://{}/metrics", c.lab.controller_status_addr()),
    ]);
    let metrics = c.lab.run_on_underlay(curl).unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(
        metrics.contains("lacewing_controller_node_applied_version{node=\"n1\"}"),
        "{metrics}"
    );
    assert_promtool_accepts(&metrics);
    // Deleting the Service takes it out of every node: its ClusterIP, in the
    // service CIDR, now refuses connections.
    fs::remove_file(c.folder.join("web.yaml")).unwrap();
    c.converge(VIP, Err("ECONNREFUSED"), Duration::from_secs(10));
}

/// Waits until node `node`'s `/status` satisfies `want`; returns it.
fn node_status_until(lab: &Lab, node: &str, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = node_http(lab, &lab.node(node).unwrap(), "/status");
        if want(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{node}: {what}; /status:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn each_node_receives_only_its_own_workloads() {
    let c = ControlLab::new([&[], &[]]);
    let pod = |name: &str, ns: &str, node: &str, ip: IpAddr| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: {node}, serviceAccountName: default}}\nstatus: {{phase: Running, podIP: \"{ip}\"}}\n"
        )
    };
    let yaml = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {lacewing.io/mesh: enabled}}\n".to_owned(),
        pod("web", "shop", "n1", c.ip4("n1-p0")),
        pod("client", "default", "n0", c.ip4("n0-p0")),
    ]
    .join("---\n");
    fs::write(c.folder.join("pods.yaml"), yaml).unwrap();
    let n1 = node_status_until(&c.lab, "n1", "web listed", |s| s.contains("\"web\""));
    assert!(!n1.contains("\"client\""), "n1 got n0's workload:\n{n1}");
    assert!(
        n1.contains("\"meshed\": true") && n1.contains(&c.ip4("n1-p0").to_string()),
        "{n1}"
    );
    let n0 = node_status_until(&c.lab, "n0", "client listed", |s| s.contains("\"client\""));
    assert!(!n0.contains("\"web\""), "n0 got n1's workload:\n{n0}");
    assert!(
        n0.contains("\"meshed\": false"),
        "default is not meshed:\n{n0}"
    );
    // The pod goes away: n1 drops it; n0 is not sent anything for it.
    fs::write(
        c.folder.join("pods.yaml"),
        pod("client", "default", "n0", c.ip4("n0-p0")),
    )
    .unwrap();
    node_status_until(&c.lab, "n1", "web removed", |s| !s.contains("\"web\""));
    assert!(node_http(&c.lab, &c.lab.node("n0").unwrap(), "/status").contains("\"client\""));
}

#[test]
fn malformed_yaml_is_rejected_with_its_file_and_changes_nothing() {
    let c = ControlLab::new([&[], &[]]);
    c.write("web.yaml", "web", VIP, &[c.ip4("n1-p0")], &[]);
    c.converge(VIP, Ok(&["n1-p0"]), Duration::from_secs(10));
    fs::write(
        c.folder.join("broken.yaml"),
        "kind: Service\nmetadata: {name: x\nspec: [",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let s = c.status();
        if s.contains("source error") || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.contains("broken.yaml") && status.contains("document 0"),
        "the error must name the file and document:\n{status}"
    );
    // A well-formed file with a bad value is rejected too, with what to fix.
    fs::remove_file(c.folder.join("broken.yaml")).unwrap();
    c.write(
        "bad-weight.yaml",
        "other",
        "10.96.0.11",
        &[c.ip4("n1-p1")],
        &[(
            "lacewing.io/backend-weights",
            format!("{}=0", c.ip4("n1-p1")),
        )],
    );
    c.status_until("the bad weight is rejected", |status| {
        status.contains("bad-weight.yaml") && status.contains("weights start at 1")
    });
    // Rejected means not sent: its service reaches no node.
    assert!(c.reached("n0-p0", "10.96.0.11").is_err());
    // A policy naming a Service that does not exist is rejected the same way.
    fs::remove_file(c.folder.join("bad-weight.yaml")).unwrap();
    fs::write(
        c.folder.join("policy.yaml"),
        "apiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: slow, namespace: default}\nspec: {targetRef: {name: nope}}\n",
    )
    .unwrap();
    c.status_until("the policy is rejected", |status| {
        status.contains("policy.yaml")
            && status.contains(
                "TrafficPolicy default/slow names Service default/nope, which does not exist",
            )
    });
    // Nothing reached the nodes: the old service still works, the new one does not exist.
    assert_eq!(
        c.reached("n0-p0", VIP),
        Ok(BTreeSet::from(["n1-p0".to_owned()]))
    );
    assert!(c.reached("n0-p0", "10.96.0.11").is_err());
}

#[test]
fn nodes_ride_out_a_controller_outage_and_catch_up() {
    let mut c = ControlLab::new([&[], &[]]);
    c.write("web.yaml", "web", VIP, &[c.ip4("n1-p0")], &[]);
    c.converge(VIP, Ok(&["n1-p0"]), Duration::from_secs(10));
    let mut controller = c.controller.take().unwrap();
    controller.signal(libc::SIGKILL).unwrap();
    let _ = controller.child_mut().wait();
    // Down for 10 s: existing services keep working; a change is made meanwhile.
    let down = Instant::now();
    c.write("web.yaml", "web", VIP, &[c.ip4("n1-p1")], &[]);
    while down.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            c.reached("n0-p0", VIP),
            Ok(BTreeSet::from(["n1-p0".to_owned()])),
            "traffic must keep flowing during the outage"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    c.controller = Some(
        c.lab
            .start_controller(&bin("lacewing-controller"), &c.folder)
            .unwrap(),
    );
    c.converge(VIP, Ok(&["n1-p1"]), Duration::from_secs(15));
}

#[test]
fn a_node_that_nacks_keeps_its_state_and_shows_in_status() {
    // n1's Maglev map holds 1,000 entries: a table of 16,381 cannot be applied there.
    let c = ControlLab::new([&[], &["--maglev-capacity", "1000"]]);
    c.write("web.yaml", "web", VIP, &[c.ip4("n1-p0")], &[]);
    c.converge(VIP, Ok(&["n1-p0"]), Duration::from_secs(10));
    c.write(
        "hash.yaml",
        "hash",
        "10.96.0.12",
        &[c.ip4("n1-p1")],
        &[("lacewing.io/lb-algorithm", "maglev".into())],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = c.status();
        let nacked = s
            .lines()
            .any(|l| l.starts_with("n1 ") && l.contains("LW_MAGLEV"));
        let n0_synced = s
            .lines()
            .any(|l| l.starts_with("n0 ") && l.contains("in sync"));
        if (nacked && n0_synced) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let n1 = status
        .lines()
        .find(|l| l.starts_with("n1 "))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        n1.contains("behind") && n1.contains("LW_MAGLEV"),
        "n1 must show the NACK: {status}"
    );
    let n0 = status.lines().find(|l| l.starts_with("n0 ")).unwrap();
    assert!(n0.contains("in sync"), "{status}");
    // n0 applied it; n1 kept its previous state, where web still works.
    assert_eq!(
        c.reached("n0-p0", "10.96.0.12"),
        Ok(BTreeSet::from(["n1-p1".to_owned()]))
    );
    assert_eq!(
        c.reached("n1-p0", VIP),
        Ok(BTreeSet::from(["n1-p0".to_owned()]))
    );
}

#[test]
fn a_node_certificate_cannot_subscribe_as_another_node() {
    // n1's daemon presents n0's certificate but says it is n1.
    let c = ControlLab::with_certificates([&[], &[]], ["n0", "n0"]);
    c.write("web.yaml", "web", VIP, &[c.ip4("n1-p0")], &[]);
    // n0 gets the service; n1 never does, and never shows as subscribed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.reached("n0-p0", VIP) != Ok(BTreeSet::from(["n1-p0".to_owned()])) {
        assert!(Instant::now() < deadline, "n0 never got the service");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The controller refuses n1's subscription, and counts it.
    let refused = "lacewing_controller_subscriptions_refused_total{reason=\"node_mismatch\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.controller_metric(refused) < 1.0 {
        assert!(Instant::now() < deadline, "the controller never refused n1");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = c.status();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("n0 ") && l.contains("in sync")),
        "{status}"
    );
    assert!(
        !status.lines().any(|l| l.starts_with("n1 ")),
        "n1 must not be able to subscribe: {status}"
    );
    let n1 = c.lab.node_bpffs_root(&c.lab.node("n1").unwrap());
    let services = lacewing_node::maps::LbMaps::open(&n1)
        .unwrap()
        .services()
        .unwrap();
    assert!(
        services.is_empty(),
        "n1 received configuration with n0's certificate: {services:?}"
    );
}
