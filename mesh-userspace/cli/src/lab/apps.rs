//! What runs in a lab: the node daemon on a node, and real applications in
//! pods (an nginx HTTP server that answers every request with a fixed body).

use std::{
    fs, io,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mesh_common::names;

use super::netns;
use super::{
    Lab, LabProcess,
    topology::{NodeSpec, PodSpec},
};
use lacewing_node::loader::links_dir;

/// The control plane's address on the underlay bridge (nodes are .1 and up).
pub const CONTROLLER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 200, 0, 254);
/// The controller's gRPC port.
pub const CONTROLLER_PORT: u16 = 15012;

/// The lab's control plane and node daemons, started by [`Lab::start_mesh`].
/// Dropping it stops them.
#[derive(Debug)]
pub struct Mesh {
    pub controller: LabProcess,
    pub nodes: Vec<LabProcess>,
    /// The YAML folder the controller serves.
    pub folder: std::path::PathBuf,
}

impl Mesh {
    /// Leaves the processes running after this handle (`lacewing lab up`).
    pub fn detach(self) {
        self.controller.detach();
        for node in self.nodes {
            node.detach();
        }
    }
}

impl Lab {
    /// Starts the `lacewing-node` binary at `bin` on `node`, attached at the
    /// node's cgroup and pinning under the lab's bpffs folder; returns once
    /// every program is attached (its link is pinned).
    pub fn start_node_daemon(&self, node: &NodeSpec, bin: &Path) -> io::Result<LabProcess> {
        self.start_node_daemon_with(node, bin, &[])
    }

    /// [`Lab::start_node_daemon`] with extra flags (`--services FILE`, ...).
    pub fn start_node_daemon_with(
        &self,
        node: &NodeSpec,
        bin: &Path,
        extra: &[&std::ffi::OsStr],
    ) -> io::Result<LabProcess> {
        self.start_node_daemon_logged(node, bin, extra, None)
    }

    /// Starts a node daemon; its output goes to `log` when given (processes
    /// left running by `lacewing lab up` must not hold the CLI's pipes open).
    fn start_node_daemon_logged(
        &self,
        node: &NodeSpec,
        bin: &Path,
        extra: &[&std::ffi::OsStr],
        log: Option<&Path>,
    ) -> io::Result<LabProcess> {
        let root = self.node_bpffs_root(node);
        let mut cmd = Command::new(bin);
        cmd.args(extra)
            .arg("--node-name")
            .arg(node.name())
            .arg("--cgroup-root")
            .arg(self.node_cgroup(node))
            .arg("--bpffs-root")
            .arg(&root)
            .arg("--run-dir")
            .arg(self.node_run_dir(node));
        log_to(&mut cmd, log)?;
        let mut daemon = self.spawn_daemon_on_node(node, cmd)?;
        let links = links_dir(&root);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = daemon.try_wait()? {
                return Err(io::Error::other(format!(
                    "lacewing-node on {} exited before attaching: {status}",
                    node.name()
                )));
            }
            if names::SOCK_ADDR_PROGRAMS
                .iter()
                .all(|p| links.join(p.name).exists())
            {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("lacewing-node on {} did not attach in 20 s", node.name()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the whole mesh: `lacewing-controller` on the underlay serving
    /// the lab's config folder (see [`Lab::config_dir`]) with the lab's Node
    /// objects in it, and `lacewing-node` on every node subscribed to it and
    /// capturing its meshed pods. `bin_dir` holds both binaries.
    pub fn start_mesh(&self, bin_dir: &Path) -> io::Result<Mesh> {
        self.start_mesh_with(bin_dir, &|_| Vec::new())
    }

    /// [`Lab::start_mesh`] with flags of each node daemon's own.
    pub fn start_mesh_with(
        &self,
        bin_dir: &Path,
        node_args: &dyn Fn(&NodeSpec) -> Vec<String>,
    ) -> io::Result<Mesh> {
        self.start_mesh_full(bin_dir, &[], node_args)
    }

    /// [`Lab::start_mesh_with`], the controller with `controller_args`.
    pub fn start_mesh_full(
        &self,
        bin_dir: &Path,
        controller_args: &[&str],
        node_args: &dyn Fn(&NodeSpec) -> Vec<String>,
    ) -> io::Result<Mesh> {
        let folder = self.config_dir();
        fs::create_dir_all(&folder)?;
        let logs = self.state_dir().join("logs");
        fs::create_dir_all(&logs)?;
        // The nodes register themselves, as kubelets do.
        fs::write(folder.join("nodes.yaml"), self.nodes_yaml())?;
        let controller = self.start_controller_logged(
            &bin_dir.join("lacewing-controller"),
            &folder,
            controller_args,
            Some(&logs.join("controller.log")),
        )?;
        let nodes = self
            .topology()
            .nodes()
            .map(|node| {
                let args = self.mesh_node_args(&node, &node_args(&node))?;
                let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
                let log = logs.join(format!("{}.log", node.name()));
                self.start_node_daemon_logged(
                    &node,
                    &bin_dir.join("lacewing-node"),
                    &args,
                    Some(&log),
                )
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Mesh {
            controller,
            nodes,
            folder,
        })
    }

    /// The flags of a mesh node daemon (subscribed, capturing) and `own`.
    fn mesh_node_args(
        &self,
        node: &NodeSpec,
        own: &[String],
    ) -> io::Result<Vec<std::ffi::OsString>> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--controller".into(),
            self.controller_url().into(),
            "--tls-dir".into(),
            self.node_credentials(node)?.into(),
            "--pod-netns-dir".into(),
            self.pod_netns_dir(node)?.into(),
            "--cni-socket".into(),
            self.cni_socket(node).into(),
        ];
        args.extend(own.iter().map(Into::into));
        Ok(args)
    }

    /// Upgrades `node`'s mesh daemon: starts a new one (the binary in
    /// `bin_dir`, with the mesh's flags and `own`), which takes over from
    /// the running one, and returns it once it answers `/status` (it then
    /// accepts on every listener; the old one drains and exits by itself).
    pub fn upgrade_mesh_node(
        &self,
        node: &NodeSpec,
        bin_dir: &Path,
        own: &[String],
        log: &Path,
    ) -> io::Result<LabProcess> {
        let args = self.mesh_node_args(node, own)?;
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let mut daemon =
            self.start_node_daemon_logged(node, &bin_dir.join("lacewing-node"), &args, Some(log))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = daemon.try_wait()? {
                return Err(io::Error::other(format!(
                    "the new lacewing-node on {} exited: {status} (see {})",
                    node.name(),
                    log.display()
                )));
            }
            let answering = self
                .node_get(node, "/status")
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|s| s["pid"].as_u64());
            if answering == Some(u64::from(daemon.pid())) {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the new lacewing-node on {} did not take over in 20 s",
                        node.name()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The folder of Kubernetes YAML the lab's controller serves.
    pub fn config_dir(&self) -> std::path::PathBuf {
        self.state_dir().join("config")
    }

    /// Starts `lacewing-controller` (the binary at `bin`) on the underlay at
    /// [`CONTROLLER_IP`], serving the YAML in `folder`; returns once it listens.
    pub fn start_controller(&self, bin: &Path, folder: &Path) -> io::Result<LabProcess> {
        self.start_controller_logged(bin, folder, &[], None)
    }

    /// [`Lab::start_controller`] with extra flags (`--workload-cert-ttl 4s`).
    pub fn start_controller_with(
        &self,
        bin: &Path,
        folder: &Path,
        extra: &[&str],
    ) -> io::Result<LabProcess> {
        self.start_controller_logged(bin, folder, extra, None)
    }

    fn start_controller_logged(
        &self,
        bin: &Path,
        folder: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> io::Result<LabProcess> {
        netns::ensure_underlay_address(&self.topology().underlay_netns(), CONTROLLER_IP)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--folder")
            .arg(folder)
            .arg("--pki-dir")
            .arg(self.pki_dir())
            .arg("--server-ip")
            .arg(CONTROLLER_IP.to_string())
            .args(extra);
        log_to(&mut cmd, log)?;
        let mut controller = self.spawn_on_underlay(cmd)?;
        controller.wait_listening(CONTROLLER_PORT, Duration::from_secs(20))?;
        Ok(controller)
    }

    /// The lab as a pod network (CNI plugin) tells a node agent about its
    /// pods: a folder with one file per pod address of `node` holding the
    /// path of the pod's network namespace and its UID
    /// (`lacewing-node --pod-netns-dir`).
    pub fn pod_netns_dir(&self, node: &NodeSpec) -> io::Result<std::path::PathBuf> {
        let dir = self.state_dir().join("netns").join(node.name());
        fs::create_dir_all(&dir)?;
        for pod in self
            .topology()
            .pods()
            .filter(|p| p.name().starts_with(&format!("{}-", node.name())))
        {
            let path = netns::path(&pod.netns());
            for ip in [pod.ip4().to_string(), pod.ip6().to_string()] {
                fs::write(dir.join(ip), format!("{}\n{}\n", path.display(), pod.uid()))?;
            }
        }
        Ok(dir)
    }

    /// Where `node`'s daemon answers the `lacewing-cni` plugin.
    pub fn cni_socket(&self, node: &NodeSpec) -> std::path::PathBuf {
        self.node_run_dir(node).join("cni.sock")
    }

    /// Chains `lacewing-cni` (the binary in `bin_dir`) into `node`'s network
    /// list with its own install step, as the chart's install container
    /// does on a cluster node.
    pub fn install_cni_plugin(&self, node: &NodeSpec, bin_dir: &Path) -> io::Result<()> {
        let out = Command::new(bin_dir.join("lacewing-cni"))
            .arg("install")
            .arg("--bin-dir")
            .arg(super::cni::bin_dir(self))
            .arg("--conf-dir")
            .arg(super::cni::conf_dir(self, node))
            .arg("--socket")
            .arg(self.cni_socket(node))
            .arg("--log-file")
            .arg(super::cni::node_dir(self, node).join("lacewing-cni.log"))
            .arg("--once")
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "lacewing-cni install on {}: {}",
                node.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Node objects for the lab's nodes (`InternalIP`: the underlay address),
    /// as a kubelet registers them.
    pub fn nodes_yaml(&self) -> String {
        self.topology()
            .nodes()
            .map(|n| {
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: \"{}\"}}]}}\n",
                    n.name(),
                    n.underlay_ip4()
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// GETs `path` of the node daemon's :15020 endpoint (`/metrics`,
    /// `/status`, ...) from inside `node`.
    pub fn node_get(&self, node: &NodeSpec, path: &str) -> io::Result<String> {
        self.node_http(node, 15020, path)
    }

    /// GETs `path` of the node daemon's endpoint on `port` of the node's
    /// loopback (15020 metrics, [`super::ADMIN_PORT`] admin), from inside
    /// `node`; a reply that is no 2xx is an error carrying its body.
    pub fn node_http(&self, node: &NodeSpec, port: u16, path: &str) -> io::Result<String> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--fail-with-body",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}{path}"),
        ]);
        let out = self.run_on_node(node, cmd)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "GET {path} on {}: {} {}",
                node.name(),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The lab's control-plane CA and certificates.
    pub fn pki_dir(&self) -> std::path::PathBuf {
        self.state_dir().join("pki")
    }

    /// Issues `node` its certificate for the controller (from the lab's CA,
    /// created by the controller or here) unless it holds one still valid,
    /// and returns the folder to pass as `lacewing-node --tls-dir`.
    pub fn node_credentials(&self, node: &NodeSpec) -> io::Result<std::path::PathBuf> {
        let dir = self.pki_dir().join("nodes").join(node.name());
        let valid = lacewing_core::pki::read_credentials(&dir)
            .ok()
            .and_then(|(_, cert, _)| lacewing_core::pki::not_after(&cert))
            .is_some_and(|t| t > std::time::SystemTime::now());
        if !valid {
            let ca = lacewing_core::pki::Ca::load_or_create(&self.pki_dir().join("ca"))
                .map_err(io::Error::other)?;
            ca.issue_node(&dir, lacewing_core::pki::DEFAULT_TRUST_DOMAIN, &node.name())
                .map_err(io::Error::other)?;
        }
        Ok(dir)
    }

    /// The controller's `/status` and `/metrics` (host:port), on the underlay.
    pub fn controller_status_addr(&self) -> String {
        format!("{CONTROLLER_IP}:15014")
    }

    /// Where nodes reach the controller.
    pub fn controller_url(&self) -> String {
        format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT}")
    }

    /// Waits until the node daemon on `node` answers `/readyz` (its datapath is
    /// attached and its first configuration applied), asking from inside the node.
    pub fn wait_node_ready(&self, node: &NodeSpec, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut cmd = Command::new("curl");
            cmd.args(["-sf", "--max-time", "1", "http://127.0.0.1:15020/readyz"]);
            if self.run_on_node(node, cmd)?.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "lacewing-node on {} not ready after {timeout:?}",
                        node.name()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts nginx in `pod`, listening on `port` (IPv4 and IPv6), answering
    /// `body` to every request; returns once it is listening.
    pub fn start_http_server(
        &self,
        pod: &PodSpec,
        port: u16,
        body: &str,
    ) -> io::Result<LabProcess> {
        self.start_nginx(pod, port, body, false)
    }

    /// As [`Lab::start_http_server`], answering with `status` (a failing
    /// backend, for retries).
    pub fn start_http_server_with_status(
        &self,
        pod: &PodSpec,
        port: u16,
        body: &str,
        status: u16,
    ) -> io::Result<LabProcess> {
        self.start_nginx_with(pod, port, body, false, status, None)
    }

    /// As [`Lab::start_h2c_server`], ending each connection (GOAWAY) after
    /// `requests` requests, as nginx does by default after 1,000.
    pub fn start_h2c_server_closing_after(
        &self,
        pod: &PodSpec,
        port: u16,
        body: &str,
        requests: u32,
    ) -> io::Result<LabProcess> {
        self.start_nginx_with(pod, port, body, true, 200, Some(requests))
    }

    /// As [`Lab::start_http_server`], speaking HTTP/2 without TLS (h2c,
    /// prior knowledge) instead of HTTP/1.1.
    pub fn start_h2c_server(&self, pod: &PodSpec, port: u16, body: &str) -> io::Result<LabProcess> {
        self.start_nginx(pod, port, body, true)
    }

    /// nginx as a reverse proxy (one worker, keep-alive upstream): each
    /// `(port, upstream)` listens on `port` (HTTP/1.1 and, with `http2`,
    /// h2c) and proxies to `upstream` (`host:port`, HTTP/1.1).
    pub fn start_nginx_proxy(
        &self,
        pod: &PodSpec,
        servers: &[(u16, String, bool)],
    ) -> io::Result<LabProcess> {
        let dir = self.state_dir().join(format!("nginx-proxy-{}", pod.name()));
        fs::create_dir_all(&dir)?;
        let mut blocks = String::new();
        for (i, (port, upstream, http2)) in servers.iter().enumerate() {
            let h2 = if *http2 { " http2" } else { "" };
            blocks.push_str(&format!(
                "    upstream u{i} {{ server {upstream}; keepalive 64; }}\n    server {{ listen 0.0.0.0:{port} reuseport{h2}; location / {{ proxy_pass http://u{i}; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n"
            ));
        }
        let port = servers.first().map_or(80, |(port, _, _)| *port);
        self.spawn_nginx(pod, &dir, &nginx_conf(&dir, &blocks), port)
    }

    fn start_nginx(
        &self,
        pod: &PodSpec,
        port: u16,
        body: &str,
        http2: bool,
    ) -> io::Result<LabProcess> {
        self.start_nginx_with(pod, port, body, http2, 200, None)
    }

    fn start_nginx_with(
        &self,
        pod: &PodSpec,
        port: u16,
        body: &str,
        http2: bool,
        status: u16,
        keepalive_requests: Option<u32>,
    ) -> io::Result<LabProcess> {
        let dir = self
            .state_dir()
            .join(format!("nginx-{}-{port}", pod.name()));
        fs::create_dir_all(&dir)?;
        let h2 = if http2 { " http2" } else { "" };
        let body = body.replace('\\', "\\\\").replace('"', "\\\"");
        let keepalive = keepalive_requests
            .map(|n| format!("        keepalive_requests {n};\n"))
            .unwrap_or_default();
        let server = format!(
            "    server {{\n        listen 0.0.0.0:{port} reuseport{h2};\n        listen [::]:{port} ipv6only=on reuseport{h2};\n{keepalive}        default_type text/plain;\n        location / {{ return {status} \"{body}\\n\"; }}\n    }}\n"
        );
        self.spawn_nginx(pod, &dir, &nginx_conf(&dir, &server), port)
    }

    /// nginx with `conf` (written to `dir`) in `pod`, once it listens on
    /// `port`.
    fn spawn_nginx(
        &self,
        pod: &PodSpec,
        dir: &Path,
        conf: &str,
        port: u16,
    ) -> io::Result<LabProcess> {
        let path = dir.join("nginx.conf");
        fs::write(&path, conf)?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path);
        let mut server = self.spawn_in_pod(pod, cmd)?;
        server.wait_listening(port, Duration::from_secs(10))?;
        Ok(server)
    }
}

/// One process (no master, no daemon) so the lab can stop it by its pid; all
/// paths inside the lab's own folder.
fn nginx_conf(dir: &Path, servers: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
{servers}}}
"#
    )
}

/// Sends a command's stdout and stderr to `log`, when given.
fn log_to(cmd: &mut Command, log: Option<&Path>) -> io::Result<()> {
    if let Some(path) = log {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        cmd.stdout(file.try_clone()?).stderr(file);
    }
    Ok(())
}
