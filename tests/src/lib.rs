//! Helpers for Lacewing's end-to-end tests: the real binaries, the real kernel
//! programs and real tools (curl, nginx, ping, bpftool) in the local lab.
//!
//! These tests need root. Where they cannot run they fail, saying why; they
//! never skip.

pub mod mesh_lab;

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use lacewing::lab::{Lab, LabId, PodSpec, sweep};

/// A lab for a test; panics with what is missing when the machine cannot run
/// one (the lab tests must run in CI, as root).
/// The pin name of map `name` (`mesh_common::names`) at this build's
/// layout version plus `bump` (what `--layout-bump` adds to the service
/// maps' versions).
pub fn map_pin(name: &str, bump: u32) -> String {
    let version = mesh_common::names::MAP_LAYOUTS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(1, |(_, v)| *v);
    lacewing_node::maps::pin_name(name, version + bump)
}

pub fn new_lab(nodes: u8, pods_per_node: u8) -> Lab {
    Lab::new(nodes, pods_per_node).unwrap_or_else(|err| {
        panic!("lab tests need a lab and could not make one (run them as root via `cargo xtask test`): {err}")
    })
}

/// A binary of this workspace, built by `cargo xtask test` before the tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name))
        .expect("test binary is in target/<profile>/deps");
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p lacewing-node -p lacewing-controller -p lacewing-cni -p lacewing --bins`; `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Runs a command in a pod and returns its output.
pub fn run_in(lab: &Lab, pod: &PodSpec, program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    lab.run_in_pod(pod, cmd)
        .unwrap_or_else(|err| panic!("running {program} in {}: {err}", pod.name()))
}

/// Runs h2load in `pod` for `requests` requests with `args` (connections,
/// streams, protocol, URL), asserts that every one succeeded with a 2xx,
/// and returns its report.
pub fn h2load_all_succeed(lab: &Lab, pod: &PodSpec, requests: u32, args: &[&str]) -> String {
    let n = requests.to_string();
    let mut all = vec!["-n", n.as_str()];
    all.extend_from_slice(args);
    let out = run_in(lab, pod, "h2load", &all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!(
            "requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, 0 errored, 0 timeout"
        )),
        "{text}"
    );
    assert!(text.contains(&format!("status codes: {n} 2xx")), "{text}");
    text
}

/// GETs `url` from `pod` with curl; the body, or curl's error.
pub fn curl(lab: &Lab, pod: &PodSpec, url: &str) -> Result<String, String> {
    let out = run_in(lab, pod, "curl", &["-sS", "--max-time", "5", url]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `http://<ip>:<port>/` for an address of either family.
pub fn url(ip: std::net::IpAddr, port: u16) -> String {
    format!("http://{}/", std::net::SocketAddr::new(ip, port))
}

/// Whether one ping from `pod` to `ip` gets an answer within a second.
pub fn ping(lab: &Lab, pod: &PodSpec, ip: std::net::IpAddr) -> bool {
    run_in(lab, pod, "ping", &["-c", "1", "-W", "1", &ip.to_string()])
        .status
        .success()
}

/// Panics, listing them, if any resource of lab `id` is left on the machine.
pub fn assert_gone(id: LabId) {
    let left = sweep::leftovers(id).expect("listing lab resources");
    assert!(
        left.is_empty(),
        "lab {} left resources behind: {left:?}",
        id.prefix()
    );
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(&id.prefix()),
        "a link of lab {} is in the machine's own namespace:\n{links}",
        id.prefix()
    );
}

/// Whether `pid` is still a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            // state is the field after the parenthesised command name
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// What `tools/lbprobe.py` saw.
#[derive(Debug, Default)]
pub struct Probe {
    pub n: u64,
    /// Backend name -> replies.
    pub replies: std::collections::BTreeMap<String, u64>,
    /// Peer address as the application saw it -> count.
    pub peers: std::collections::BTreeMap<String, u64>,
    /// errno name -> count.
    pub errors: std::collections::BTreeMap<String, u64>,
    pub slowest_ms: f64,
}

/// A helper script of `tests/tools`.
pub fn tool(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(name)
}

/// Debian's python3 (not a version manager's shim, which may not see its
/// environment inside a pod).
pub const PYTHON: &str = "/usr/bin/python3";

/// Runs `lbprobe.py MODE HOST PORT ARG` in `pod`.
pub fn probe(
    lab: &Lab,
    pod: &PodSpec,
    mode: &str,
    host: std::net::IpAddr,
    port: u16,
    arg: &str,
) -> Probe {
    let script = tool("lbprobe.py");
    let out = run_in(
        lab,
        pod,
        PYTHON,
        &[
            script.to_str().unwrap(),
            mode,
            &host.to_string(),
            &port.to_string(),
            arg,
        ],
    );
    assert!(
        out.status.success(),
        "lbprobe in {} failed: {}",
        pod.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_probe(&out.stdout)
}

pub fn parse_probe(stdout: &[u8]) -> Probe {
    let v: serde_json::Value = serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "lbprobe printed no JSON ({e}): {}",
            String::from_utf8_lossy(stdout)
        )
    });
    let counts = |k: &str| {
        v[k].as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    Probe {
        n: v["n"].as_u64().unwrap_or(0),
        replies: counts("replies"),
        peers: counts("peers"),
        errors: counts("errors"),
        slowest_ms: v["slowest_ms"].as_f64().unwrap_or(0.0),
    }
}

/// Starts `lbserver.py` in `pod`: it answers TCP and UDP on `port` with the
/// pod's name.
pub fn start_backend(lab: &Lab, pod: &PodSpec, port: u16) -> lacewing::lab::LabProcess {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(tool("lbserver.py"))
        .arg(pod.name())
        .arg(port.to_string());
    let mut p = lab.spawn_in_pod(pod, cmd).expect("start lbserver");
    p.wait_listening(port, std::time::Duration::from_secs(10))
        .expect("lbserver listening");
    p
}

/// A Service with TCP port `80 -> target` and UDP port `53 -> target` on
/// `cluster_ips`, and one EndpointSlice per family with `backends` (ready)
/// and `not_ready`; `extra` is added to the Service's metadata and spec.
pub struct ServiceYaml<'a> {
    pub name: &'a str,
    pub cluster_ips: &'a [std::net::IpAddr],
    pub target: u16,
    pub backends: &'a [std::net::IpAddr],
    pub annotations: &'a [(&'a str, String)],
    pub affinity_timeout_s: Option<u32>,
}

impl ServiceYaml<'_> {
    pub fn render(&self) -> String {
        let ips: Vec<String> = self.cluster_ips.iter().map(|i| i.to_string()).collect();
        let ann: String = self
            .annotations
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect();
        let affinity = match self.affinity_timeout_s {
            Some(t) => format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n"
            ),
            None => String::new(),
        };
        let mut out = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n{ann}    x: \"y\"\nspec:\n  clusterIPs: [{ips}]\n  ports:\n  - {{name: tcp, port: 80, protocol: TCP, targetPort: {t}}}\n  - {{name: udp, port: 53, protocol: UDP, targetPort: {t}}}\n{affinity}",
            name = self.name,
            ips = ips.join(", "),
            t = self.target,
        );
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let eps: Vec<String> = self
                .backends
                .iter()
                .filter(|b| b.is_ipv4() == v4)
                .map(|b| format!("- addresses: [\"{b}\"]\n  conditions: {{ready: true}}\n"))
                .collect();
            out.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{f}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n- {{name: tcp, port: {t}, protocol: TCP}}\n- {{name: udp, port: {t}, protocol: UDP}}\nendpoints:{eps}",
                name = self.name,
                f = family.to_lowercase(),
                t = self.target,
                eps = if eps.is_empty() { " []\n".to_owned() } else { format!("\n{}", eps.concat()) },
            ));
        }
        out
    }
}

/// The sock_ops programs bpftool lists at cgroup `dir`, attached there
/// (or, with `effective`, every one that runs for its sockets).
pub fn sock_ops_at(dir: &std::path::Path, effective: bool) -> usize {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "cgroup", "show"]).arg(dir);
    if effective {
        cmd.arg("effective");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|p| p["attach_type"] == "cgroup_sock_ops" && p["name"] == "lw_sockops")
        .count()
}

/// GETs `path` of the node daemon's :15020 endpoint from inside the node.
pub fn node_http(lab: &Lab, node: &lacewing::lab::NodeSpec, path: &str) -> String {
    lab.node_get(node, path)
        .unwrap_or_else(|err| panic!("{err}"))
}

/// Asserts that Prometheus' own checker accepts a `/metrics` exposition.
/// The sum of the values of the Prometheus text lines that start with
/// `line_start` (a metric name, with labels to pick one series).
pub fn metric_sum(exposition: &str, line_start: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn assert_promtool_accepts(metrics: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (install it with `cargo xtask setup`)");
    std::io::Write::write_all(
        &mut promtool.stdin.take().expect("stdin"),
        metrics.as_bytes(),
    )
    .expect("writing to promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(checked.status.success(), "promtool: {checked:?}\n{metrics}");
}

/// Starts `lacewing-node` on each of the lab's nodes, subscribed to the lab's
/// controller with the node's own certificate; with `capture`, it also
/// captures the node's meshed pods (`--pod-netns-dir` for the lab's own
/// pods, `--cni-socket` for pods added through the CNI chain).
pub fn start_subscribed_nodes(lab: &Lab, capture: bool) -> Vec<lacewing::lab::LabProcess> {
    start_subscribed_nodes_with(lab, capture, &|_, _| Vec::new())
}

/// [`start_subscribed_nodes`] with flags of each node's own (`extra`).
pub fn start_subscribed_nodes_with(
    lab: &Lab,
    capture: bool,
    extra: &dyn Fn(&Lab, &lacewing::lab::NodeSpec) -> Vec<String>,
) -> Vec<lacewing::lab::LabProcess> {
    lab.topology()
        .nodes()
        .map(|node| {
            // The node's own flags first: they may issue it a certificate
            // of their own, which the lab then keeps.
            let extra = extra(lab, &node);
            let mut args = subscribed_node_args(lab, &node, capture);
            args.extend(extra.into_iter().map(Into::into));
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            lab.start_node_daemon_with(&node, &bin("lacewing-node"), &args)
                .expect("start lacewing-node")
        })
        .collect()
}

/// The flags of a node daemon subscribed to the lab's controller (and,
/// with `capture`, capturing its meshed pods).
pub fn subscribed_node_args(
    lab: &Lab,
    node: &lacewing::lab::NodeSpec,
    capture: bool,
) -> Vec<std::ffi::OsString> {
    let tls = lab.node_credentials(node).expect("node certificate");
    let mut args: Vec<std::ffi::OsString> = vec![
        "--controller".into(),
        lab.controller_url().into(),
        "--tls-dir".into(),
        tls.into(),
    ];
    if capture {
        args.push("--pod-netns-dir".into());
        args.push(lab.pod_netns_dir(node).expect("pod netns folder").into());
        args.push("--cni-socket".into());
        args.push(lab.cni_socket(node).into());
    }
    args
}

/// A file of the workspace, by its path from the root.
pub fn workspace_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .join(relative)
}

/// The OpenTelemetry collector `cargo xtask setup` installs (rotel).
pub const OTEL_COLLECTOR: &str = "target/otel/rotel/rotel-agent";

/// Spans as the collector's detailed debug log shows them.
pub mod otel {
    /// One span, with its resource's attributes and its own.
    #[derive(Debug, Default, Clone)]
    pub struct Span {
        pub trace: String,
        pub id: String,
        pub parent: String,
        pub name: String,
        pub attributes: Vec<(String, String)>,
    }

    impl Span {
        pub fn attribute(&self, key: &str) -> Option<&str> {
            self.attributes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    /// `-> key: Str(value)` (or `Int(3)`): the key and the bare value.
    fn attribute(line: &str) -> Option<(String, String)> {
        let rest = line.trim().strip_prefix("->")?.trim();
        let (key, value) = rest.split_once(": ")?;
        let value = match value.split_once('(') {
            Some((_, v)) => v.strip_suffix(')').unwrap_or(v),
            None => value,
        };
        Some((key.trim().to_owned(), value.to_owned()))
    }

    /// The spans of `trace` in the log `text`.
    pub fn spans(text: &str, trace: &str) -> Vec<Span> {
        let mut out: Vec<Span> = Vec::new();
        let mut resource: Vec<(String, String)> = Vec::new();
        let mut in_resource = false;
        let mut current: Option<Span> = None;
        for line in text.lines() {
            let trimmed = line.trim();
            let field = |name: &str| {
                trimmed
                    .strip_prefix(name)
                    .and_then(|r| r.trim_start().strip_prefix(':'))
                    .map(|v| v.trim().to_owned())
            };
            if trimmed.starts_with("ResourceSpans #") {
                out.extend(current.take());
                resource.clear();
                in_resource = false;
            } else if trimmed.starts_with("Resource attributes") {
                in_resource = true;
            } else if trimmed.starts_with("Span #") {
                out.extend(current.take());
                in_resource = false;
                current = Some(Span {
                    attributes: resource.clone(),
                    ..Span::default()
                });
            } else if let Some(kv) = attribute(line) {
                match current.as_mut() {
                    Some(span) => span.attributes.push(kv),
                    None if in_resource => resource.push(kv),
                    None => {}
                }
            } else if let Some(span) = current.as_mut() {
                if let Some(v) = field("Trace ID") {
                    span.trace = v;
                } else if let Some(v) = field("Parent ID") {
                    span.parent = v;
                } else if let Some(v) = field("ID") {
                    span.id = v;
                } else if let Some(v) = field("Name") {
                    span.name = v;
                }
            }
        }
        out.extend(current);
        out.retain(|s| s.trace == trace);
        out
    }
}
