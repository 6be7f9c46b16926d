//! The mesh lab the mesh and lifecycle tests share: a controller watching a
//! folder, two nodes with capture, and xfer.py servers.
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

use crate::{PYTHON, bin, new_lab, node_http, start_subscribed_nodes_with, tool};

pub const VIP: &str = "10.96.0.20";

pub const PORT: &str = "9000";

pub struct MeshLab {
    pub lab: Lab,
    controller: LabProcess,
    controller_args: Vec<String>,
    pub nodes: Vec<LabProcess>,
    pub servers: Vec<LabProcess>,
}

pub fn pod(ns: &str, name: &str, sa: &str, node: &str, ips: [String; 2]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
        ips[0], ips[1]
    )
}

impl MeshLab {
    #[expect(
        clippy::new_without_default,
        reason = "a lab is made on purpose, never as a default value"
    )]
    pub fn new() -> Self {
        Self::with_controller_args(&[])
    }

    pub fn with_controller_args(controller_args: &[&str]) -> Self {
        Self::build(controller_args, true)
    }

    /// With `plain`, n0-p1 is the plain pod; without it, n0-p1 is in no
    /// configuration yet (a pod about to start).
    pub fn build(controller_args: &[&str], plain: bool) -> Self {
        Self::build_with(controller_args, plain, &|_, _| Vec::new())
    }

    /// [`MeshLab::build`] with flags of each node daemon's own.
    pub fn build_with(
        controller_args: &[&str],
        plain: bool,
        node_args: &dyn Fn(&Lab, &lacewing::lab::NodeSpec) -> Vec<String>,
    ) -> Self {
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
            if plain {
                pod("default", "plain", "default", "n0", ips("n0-p1"))
            } else {
                String::new()
            },
            pod("shop", "web-0", "web", "n1", ips("n1-p0")),
            pod("shop", "web-1", "web", "n1", ips("n1-p1")),
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: {VIP}, ports: [{{name: tcp, port: 80, targetPort: {PORT}}}]}}\n"),
            format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-v4, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: tcp, port: {PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n", ips("n1-p0")[0]),
        ];
        let docs: Vec<String> = docs.into_iter().filter(|d| !d.is_empty()).collect();
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
        let nodes = start_subscribed_nodes_with(&lab, true, node_args);
        let m = Self {
            lab,
            controller,
            controller_args: controller_args.iter().map(|a| (*a).to_owned()).collect(),
            nodes,
            servers,
        };
        m.wait_for_certificate("n0", "spiffe://cluster.local/ns/shop/sa/client");
        m.wait_for_certificate("n1", "spiffe://cluster.local/ns/shop/sa/web");
        m
    }

    /// Starts tshark on the underlay bridge for `seconds` and returns once
    /// it captures; [`UnderlayCapture::finish`] waits for it to end.
    pub fn capture_underlay(&self, name: &str, seconds: u32) -> UnderlayCapture {
        let pcap = self.lab.state_dir().join(format!("{name}.pcap"));
        let mut tshark = Command::new("tshark");
        tshark
            .args([
                "-q",
                "-i",
                "br0",
                "-a",
                &format!("duration:{seconds}"),
                "-w",
            ])
            .arg(&pcap)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let process = self.lab.spawn_on_underlay(tshark).unwrap();
        // tshark writes the capture file's header once it is capturing.
        poll("tshark is capturing", Duration::from_secs(10), || {
            fs::metadata(&pcap).ok().filter(|f| f.len() > 0).map(drop)
        });
        UnderlayCapture { pcap, process }
    }

    /// A workload certificate from the lab's CA for `identity`, written for
    /// a client outside the daemons: (cert, key, CA bundle) paths.
    pub fn workload_credentials(&self, identity: &str) -> Credentials {
        let ca = lacewing_core::pki::Ca::load_or_create(&self.lab.pki_dir().join("ca")).unwrap();
        self.credentials_signed_by(&ca, identity, ca.pem(), "lab")
    }

    /// A certificate for `identity` signed by `ca` (valid for an hour),
    /// with `trusted` as the client's own roots, written under `name`.
    pub fn credentials_signed_by(
        &self,
        ca: &lacewing_core::pki::Ca,
        identity: &str,
        trusted: &str,
        name: &str,
    ) -> Credentials {
        let (key, csr) = lacewing_core::pki::new_key_and_csr(identity).unwrap();
        let cert = ca
            .sign_csr(&csr, identity, Duration::from_secs(3600))
            .unwrap();
        let dir = self
            .lab
            .state_dir()
            .join("clients")
            .join(format!("{name}-{}", identity.replace('/', "_")));
        fs::create_dir_all(&dir).unwrap();
        let creds = Credentials {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        };
        fs::write(&creds.cert, cert).unwrap();
        fs::write(&creds.key, key.serialize_pem()).unwrap();
        fs::write(&creds.ca, trusted).unwrap();
        creds
    }

    /// `hbone.py`'s line for `mode` against `host:port`, run on node n0 (a
    /// node's address, which may open tunnel connections).
    pub fn hbone(&self, host: &str, port: u16, creds: &Credentials, mode: &[&str]) -> String {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(tool("hbone.py"))
            .arg(host)
            .arg(port.to_string())
            .args([&creds.cert, &creds.key, &creds.ca])
            .args(mode);
        let out = self
            .lab
            .run_on_node(&self.lab.node("n0").unwrap(), cmd)
            .unwrap();
        assert!(out.status.success(), "hbone.py {mode:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The controller's metric (see [`MeshLab::metric`]), from :15014.
    pub fn controller_metric(&self, line_start: &str) -> f64 {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            &format!("http://{}/metrics", self.lab.controller_status_addr()),
        ]);
        let out = self.lab.run_on_underlay(cmd).unwrap();
        crate::metric_sum(&String::from_utf8_lossy(&out.stdout), line_start)
    }

    /// Kills the controller and starts a new one with the same flags; the
    /// nodes reconnect to it (with the credentials in their --tls-dir).
    pub fn restart_controller(&mut self) {
        self.controller.signal(libc::SIGKILL).unwrap();
        let _ = self.controller.child_mut().wait();
        let args: Vec<&str> = self.controller_args.iter().map(String::as_str).collect();
        self.controller = self
            .lab
            .start_controller_with(
                &bin("lacewing-controller"),
                &self.lab.state_dir().join("config"),
                &args,
            )
            .unwrap();
    }

    pub fn wait_for_certificate(&self, node: &str, identity: &str) {
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
    pub fn spawn_xfer(&self, pod: &str, args: &[&str]) -> LabProcess {
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
    pub fn serial(&self, node: &str, identity: &str) -> Option<String> {
        let status = node_http(&self.lab, &self.lab.node(node).unwrap(), "/status");
        let json: serde_json::Value = serde_json::from_str(&status).ok()?;
        json["certificates"]
            .as_array()?
            .iter()
            .find(|c| c["identity"] == identity)
            .and_then(|c| c["serial"].as_str().map(str::to_owned))
    }

    pub fn xfer(&self, pod: &str, args: &[&str]) -> String {
        self.try_xfer(pod, args)
            .unwrap_or_else(|err| panic!("xfer.py {args:?} in {pod}: {err}"))
    }

    /// xfer.py's output, or its error.
    pub fn try_xfer(&self, pod: &str, args: &[&str]) -> Result<String, String> {
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

    /// Waits for an `xfer.py bulk` of `mib` MiB and asserts that every byte
    /// went and came back intact (counts and SHA-256 both ways).
    pub fn assert_bulk_intact(bulk: LabProcess, mib: u64) {
        let out = bulk.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(field(&text, "sent"), (mib << 20).to_string(), "{text}");
        assert_eq!(field(&text, "back"), field(&text, "sent"), "{text}");
        assert_eq!(field(&text, "back_sha"), field(&text, "sent_sha"), "{text}");
    }

    /// Writes (or with `None` removes) a file of the controller's folder.
    pub fn config(&self, file: &str, yaml: Option<&str>) {
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
    pub fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn metric(&self, node: &str, line_start: &str) -> f64 {
        let metrics = node_http(&self.lab, &self.lab.node(node).unwrap(), "/metrics");
        crate::metric_sum(&metrics, line_start)
    }

    /// `tool` (in tests/tools) started in `pod`, listening on `port`.
    pub fn serve_tool(&self, pod: &str, tool_name: &str, args: &[&str], port: u16) -> LabProcess {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(tool(tool_name)).args(args);
        let mut server = self
            .lab
            .spawn_in_pod(&self.lab.pod(pod).unwrap(), cmd)
            .unwrap();
        server
            .wait_listening(port, Duration::from_secs(10))
            .unwrap();
        server
    }

    /// `lacewing routes` for `node`, as its daemon holds them.
    pub fn routes_listing(&self, node: &str) -> String {
        let mut cmd = Command::new(bin("lacewing"));
        let node = self.lab.node(node).unwrap();
        cmd.args([
            "routes",
            "--node-addr",
            &format!("{}:15020", node.underlay_ip4()),
        ]);
        let out = self.lab.run_on_underlay(cmd).unwrap();
        assert!(out.status.success(), "lacewing routes: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tool`'s output in `pod`; panics with its stderr if it failed.
    pub fn run_tool(&self, pod: &str, tool_name: &str, args: &[&str]) -> String {
        self.try_run_tool(pod, tool_name, args)
            .unwrap_or_else(|err| panic!("{tool_name} {args:?} in {pod}: {err}"))
    }

    /// `tool`'s output in `pod`, or its stderr if it failed (while a
    /// configuration is on its way).
    pub fn try_run_tool(
        &self,
        pod: &str,
        tool_name: &str,
        args: &[&str],
    ) -> Result<String, String> {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(tool(tool_name)).args(args);
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

    /// Starts a new daemon on node `index` with `extra` flags besides the
    /// mesh's, and waits until it took over (its `/status` answers with its
    /// pid); the old daemon, draining. The new one logs to the lab's
    /// `logs/<node>-<k>.log`.
    pub fn upgrade_node(&mut self, index: usize, extra: &[&str]) -> LabProcess {
        let node = self.lab.topology().nodes().nth(index).unwrap();
        let logs = self.lab.state_dir().join("logs");
        fs::create_dir_all(&logs).unwrap();
        let log = (1..)
            .map(|k| logs.join(format!("{}-{k}.log", node.name())))
            .find(|p| !p.exists())
            .unwrap();
        let own: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        let started = Instant::now();
        let bin = bin("lacewing-node");
        let new = self
            .lab
            .upgrade_mesh_node(&node, bin.parent().unwrap(), &own, &log)
            .unwrap_or_else(|e| panic!("{e}: {}", fs::read_to_string(&log).unwrap_or_default()));
        eprintln!(
            "measured: {} taken over {:?} after the new daemon was started",
            node.name(),
            started.elapsed()
        );
        std::mem::replace(&mut self.nodes[index], new)
    }

    /// Entries in `node`'s two splice sockhashes, as bpftool lists them.
    pub fn spliced_sockets(&self, node: &str) -> usize {
        ["LW_SPLICE", "LW_SPLICE_TO"]
            .iter()
            .map(|map| self.map_entries(node, map))
            .sum()
    }

    pub fn map_entries(&self, node: &str, name: &str) -> usize {
        let entries: serde_json::Value = serde_json::from_str(&self.map_dump(node, name)).unwrap();
        entries.as_array().unwrap().len()
    }

    /// `bpftool -j map dump` of `node`'s map pinned as `pin` (`LW_SERVICES`,
    /// `LW_SERVICES_v2`).
    pub fn map_dump(&self, node: &str, pin: &str) -> String {
        let map = self
            .lab
            .node_bpffs_root(&self.lab.node(node).unwrap())
            .join("maps")
            .join(pin);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool map dump {}: {}",
            map.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn added(&self, node: &str, leg: &str) -> f64 {
        self.metric(
            node,
            &format!("lacewing_splice_sockets_added_total{{leg=\"{leg}\"}}"),
        )
    }

    /// `lacewing acceleration on|off --fast-path on|off` on `node`.
    pub fn switch_acceleration(&self, node: &str, state: &str, fast_path: &str) {
        let root = self.lab.node_bpffs_root(&self.lab.node(node).unwrap());
        let out = Command::new(bin("lacewing"))
            .args([
                "acceleration",
                state,
                "--fast-path",
                fast_path,
                "--bpffs-root",
            ])
            .arg(root)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("acceleration: {state}")),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn decisions(&self, node: &str, path: &str, reason: &str) -> f64 {
        self.metric(
            node,
            &format!("lacewing_fast_path_decisions_total{{path=\"{path}\",reason=\"{reason}\"}}"),
        )
    }
}

/// Polls `f` every 50 ms until it gives a value, for at most `limit`.
pub fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of `name=` in xfer.py's output.
pub fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in `{text}`"))
}

/// A client's certificate, key and trust bundle, as files.
pub struct Credentials {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

/// tshark capturing on the underlay (see [`MeshLab::capture_underlay`]).
pub struct UnderlayCapture {
    pcap: std::path::PathBuf,
    process: LabProcess,
}

impl UnderlayCapture {
    /// Waits for the capture to end; then `count` reads it.
    pub fn finish(self) -> CapturedFile {
        let done = self.process.wait_with_output().unwrap();
        assert!(done.status.success(), "tshark: {done:?}");
        CapturedFile(self.pcap)
    }
}

/// A finished capture.
pub struct CapturedFile(std::path::PathBuf);

impl CapturedFile {
    /// How many frames match the display filter.
    pub fn count(&self, filter: &str) -> usize {
        let out = Command::new("tshark")
            .args(["-r"])
            .arg(&self.0)
            .args(["-Y", filter])
            .output()
            .unwrap();
        assert!(out.status.success(), "tshark -Y {filter}: {out:?}");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Asserts every TLS ServerHello captured (at least one) chose TLS 1.3.
    pub fn assert_tls13_only(&self) {
        let hellos = self.count("tls.handshake.type == 2");
        assert!(hellos > 0, "no TLS handshake captured");
        assert_eq!(
            self.count(
                "tls.handshake.type == 2 && tls.handshake.extensions.supported_version == 0x0304"
            ),
            hellos
        );
    }
}
