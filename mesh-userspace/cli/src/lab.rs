//! The local lab: a whole cluster on one Linux machine, as root. Every node and
//! pod is a network namespace, pods hang off their node by veth (made by the
//! CNI reference plugins, run as a container runtime runs them), nodes share an
//! underlay bridge in a namespace of its own, and each pod's processes live in a
//! cgroup below its node's cgroup, so a node daemon attaches its programs at the
//! node's cgroup exactly as it would at a real node's root.
//!
//! Rules it keeps: it never uses the machine's own network namespace or root
//! cgroup; no lab namespace has a route out; every resource carries the lab's
//! prefix `lw-<id>`; everything is removed on drop, on panic (drop runs while
//! unwinding), and by [`sweep`] for what a killed process left behind.

mod apps;
pub mod cni;
mod netns;
mod preflight;
mod process;
mod state;
pub mod sweep;
pub mod topology;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

pub use apps::{CONTROLLER_IP, CONTROLLER_PORT, Mesh};

/// The node daemon's admin endpoint, on each node's loopback.
pub const ADMIN_PORT: u16 = 15000;
pub use process::LabProcess;
pub use state::Record;
pub use topology::{LabId, NodeSpec, PodSpec, Topology};

/// Why a lab could not be made or used. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab cannot start on this machine; missing:\n  - {}", .0.join("\n  - "))]
    Preflight(Vec<String>),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error("no lab {0}: `lacewing lab status` lists the labs on this machine")]
    NotFound(String),
    #[error("{what} lab has no {kind} `{name}`; it has: {have}")]
    NoSuchPlace {
        what: String,
        kind: &'static str,
        name: String,
        have: String,
    },
    #[error("building lab {id}: {source}")]
    Build { id: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Teardown(#[from] sweep::TeardownError),
}

/// A pod's sandbox made after the lab: [`Lab::sandbox`].
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub node: NodeSpec,
    /// How the runtime names it to the CNI plugins.
    pub pod: cni::PodRef,
    pub netns_name: String,
    pub cgroup: PathBuf,
}

/// A running lab. Dropping it removes everything it made, unless it was
/// [detached](Lab::detach) to outlive this process (`lacewing lab up`).
#[derive(Debug)]
pub struct Lab {
    topo: Topology,
    cgroup2: PathBuf,
    /// Set when the handle must not tear the lab down on drop.
    detached: bool,
}

impl Lab {
    /// Builds a lab of `nodes` nodes with `pods_per_node` pods each. Checks the
    /// machine first, and sweeps labs whose owning process died.
    pub fn new(nodes: u8, pods_per_node: u8) -> Result<Self, LabError> {
        let host = preflight::check().map_err(LabError::Preflight)?;
        for id in sweep::stale()? {
            tracing::info!(lab = %id.prefix(), "removed a stale lab left by a process that died");
        }
        let id = loop {
            let id = LabId::random();
            if !sweep::all_ids()?.contains(&id) {
                break id;
            }
        };
        let topo = Topology::new(id, nodes, pods_per_node).map_err(LabError::Topology)?;
        // The record goes first: from here on, drop (and the sweep) can find
        // and remove whatever part of the lab exists.
        state::write(&Record {
            topology: topo,
            owner_pid: Some(std::process::id()),
            cgroup2: host.cgroup2.clone(),
        })?;
        let lab = Self {
            topo,
            cgroup2: host.cgroup2,
            detached: false,
        };
        lab.build().map_err(|source| LabError::Build {
            id: id.prefix(),
            source,
        })?;
        tracing::info!(lab = %id.prefix(), nodes, pods_per_node, "lab up");
        Ok(lab)
    }

    /// Opens a lab another process made (for `lacewing lab exec/down`). The
    /// handle does not remove the lab on drop.
    pub fn open(id: LabId) -> Result<Self, LabError> {
        let record = state::read(id).map_err(|_| LabError::NotFound(id.prefix()))?;
        Ok(Self {
            topo: record.topology,
            cgroup2: record.cgroup2,
            detached: true,
        })
    }

    /// The records of every lab on this machine.
    pub fn list() -> Result<Vec<Record>, LabError> {
        Ok(sweep::all_ids()?
            .into_iter()
            .filter_map(|id| state::read(id).ok())
            .collect())
    }

    fn build(&self) -> std::io::Result<()> {
        fs::create_dir_all(self.bpffs_root())?;
        fs::create_dir(self.cgroup_root())?;
        fs::create_dir(self.controller_cgroup())?;
        for node in self.topo.nodes() {
            fs::create_dir(self.node_cgroup(&node))?;
            fs::create_dir(self.daemon_cgroup(&node))?;
        }
        for pod in self.topo.pods() {
            fs::create_dir_all(self.pod_cgroup(&pod))?;
        }
        netns::build(&self.topo)?;
        cni::configure(self)?;
        cni::wire_topology(self)
    }

    /// Makes a pod's sandbox after the lab was made, as a kubelet does
    /// before it calls the CNI plugins: a network namespace
    /// (`lw-<id>-<node>-<name>`) with no links yet, and a cgroup below the
    /// node's named by the pod's UID (`kubepods/pod<uid>`, the kubelet's
    /// cgroupfs layout). [`cni::add`] wires it.
    pub fn sandbox(
        &self,
        node: &NodeSpec,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> std::io::Result<Sandbox> {
        let netns_name = format!("{}-{}-{name}", self.topo.id.prefix(), node.name());
        let out = Command::new("ip")
            .args(["netns", "add", &netns_name])
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "ip netns add {netns_name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let sysctl = Command::new("ip")
            .args(["netns", "exec", &netns_name, "sysctl", "-q", "-w"])
            .args([
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ])
            .status()?;
        if !sysctl.success() {
            return Err(std::io::Error::other(format!(
                "sysctl in {netns_name} failed"
            )));
        }
        let cgroup = self.node_cgroup(node).join(topology::kubepods_cgroup(uid));
        fs::create_dir_all(&cgroup)?;
        Ok(Sandbox {
            node: *node,
            pod: cni::PodRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                uid: uid.to_owned(),
                container_id: format!("{netns_name}-{}", std::process::id()),
                netns: netns::path(&netns_name),
            },
            netns_name,
            cgroup,
        })
    }

    /// Starts `cmd` in a sandbox: its namespace and its cgroup.
    pub fn spawn_in_sandbox(&self, sandbox: &Sandbox, cmd: Command) -> std::io::Result<LabProcess> {
        LabProcess::spawn(
            cmd,
            sandbox.pod.name.clone(),
            &sandbox.pod.netns,
            &sandbox.cgroup,
        )
    }

    /// Runs `cmd` in a sandbox to completion.
    pub fn run_in_sandbox(&self, sandbox: &Sandbox, mut cmd: Command) -> std::io::Result<Output> {
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.spawn_in_sandbox(sandbox, cmd)?.wait_with_output()
    }

    /// The node's end of a pod's veth (the plugin names it).
    pub fn pod_link(&self, pod: &PodSpec) -> std::io::Result<String> {
        let out = Command::new("ip")
            .args(["-n", &pod.node.netns(), "-o", "route", "get"])
            .arg(pod.ip4().to_string())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .map(str::to_owned)
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "no route to {} on {}: {text}",
                    pod.ip4(),
                    pod.node.name()
                ))
            })
    }

    /// Keeps the lab after this handle is gone; `lacewing lab down` removes
    /// it, and with an `owner` the sweep does too once that process is gone.
    pub fn detach(mut self, owner: Option<u32>) -> Result<LabId, LabError> {
        self.detached = true;
        state::write(&Record {
            owner_pid: owner,
            ..self.record()
        })?;
        Ok(self.topo.id)
    }

    /// Removes the lab now and reports what could not be removed.
    pub fn down(mut self) -> Result<(), LabError> {
        self.detached = true;
        sweep::teardown(self.topo.id).map_err(LabError::Teardown)
    }

    /// What the lab's record says about it.
    pub fn record(&self) -> Record {
        let owner_pid = (!self.detached).then(std::process::id);
        Record {
            topology: self.topo,
            owner_pid,
            cgroup2: self.cgroup2.clone(),
        }
    }

    pub fn id(&self) -> LabId {
        self.topo.id
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Node by name (`n0`), or an error listing the nodes there are.
    pub fn node(&self, name: &str) -> Result<NodeSpec, LabError> {
        self.topo.node(name).ok_or_else(|| LabError::NoSuchPlace {
            what: self.topo.id.prefix(),
            kind: "node",
            name: name.to_owned(),
            have: self
                .topo
                .nodes()
                .map(|n| n.name())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Pod by name (`n0-p1`), or an error listing the pods there are.
    pub fn pod(&self, name: &str) -> Result<PodSpec, LabError> {
        self.topo.pod(name).ok_or_else(|| LabError::NoSuchPlace {
            what: self.topo.id.prefix(),
            kind: "pod",
            name: name.to_owned(),
            have: self
                .topo
                .pods()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The lab's own cgroup, parent of every node cgroup.
    pub fn cgroup_root(&self) -> PathBuf {
        sweep::cgroup_dir(&self.cgroup2, self.topo.id)
    }

    /// A node's cgroup: where its daemon attaches, as at a real node's root.
    pub fn node_cgroup(&self, node: &NodeSpec) -> PathBuf {
        self.cgroup_root().join(node.cgroup())
    }

    /// A node daemon's cgroup, below the node's.
    pub fn daemon_cgroup(&self, node: &NodeSpec) -> PathBuf {
        self.cgroup_root().join(node.daemon_cgroup())
    }

    /// The control plane's cgroup (its processes run on the underlay).
    pub fn controller_cgroup(&self) -> PathBuf {
        self.cgroup_root().join("cp")
    }

    pub fn pod_cgroup(&self, pod: &PodSpec) -> PathBuf {
        self.cgroup_root().join(pod.cgroup())
    }

    /// The lab's folder on bpffs (`/sys/fs/bpf/lw-<id>`).
    pub fn bpffs_root(&self) -> PathBuf {
        sweep::bpffs_dir(self.topo.id)
    }

    /// Where a node's daemon pins its maps and links.
    pub fn node_bpffs_root(&self, node: &NodeSpec) -> PathBuf {
        self.bpffs_root().join(node.name())
    }

    /// A node daemon's run directory (its handoff socket), in the lab's
    /// state folder: never the host's `/run/lacewing`.
    pub fn node_run_dir(&self, node: &NodeSpec) -> PathBuf {
        self.state_dir().join("run").join(node.name())
    }

    /// The lab's folder for configs and logs (removed with the lab).
    pub fn state_dir(&self) -> PathBuf {
        state::dir(self.topo.id)
    }

    /// Starts `cmd` in `pod`: its network namespace and its cgroup.
    pub fn spawn_in_pod(&self, pod: &PodSpec, cmd: Command) -> Result<LabProcess, std::io::Error> {
        LabProcess::spawn(
            cmd,
            pod.name(),
            &netns::path(&pod.netns()),
            &self.pod_cgroup(pod),
        )
    }

    /// Starts `cmd` on `node`: the node's namespace and cgroup.
    pub fn spawn_on_node(
        &self,
        node: &NodeSpec,
        cmd: Command,
    ) -> Result<LabProcess, std::io::Error> {
        self.spawn_on_node_in(node, cmd, &self.node_cgroup(node))
    }

    /// Starts a node daemon on `node`: the node's namespace, the daemon's
    /// cgroup.
    pub fn spawn_daemon_on_node(
        &self,
        node: &NodeSpec,
        cmd: Command,
    ) -> Result<LabProcess, std::io::Error> {
        self.spawn_on_node_in(node, cmd, &self.daemon_cgroup(node))
    }

    fn spawn_on_node_in(
        &self,
        node: &NodeSpec,
        cmd: Command,
        cgroup: &Path,
    ) -> Result<LabProcess, std::io::Error> {
        LabProcess::spawn(cmd, node.name(), &netns::path(&node.netns()), cgroup)
    }

    /// Starts `cmd` on the underlay (the control plane's place), in the
    /// controller's cgroup.
    pub fn spawn_on_underlay(&self, cmd: Command) -> Result<LabProcess, std::io::Error> {
        LabProcess::spawn(
            cmd,
            "controller".into(),
            &netns::path(&self.topo.underlay_netns()),
            &self.controller_cgroup(),
        )
    }

    /// Runs `cmd` in `pod` to completion and returns its output.
    pub fn run_in_pod(&self, pod: &PodSpec, mut cmd: Command) -> Result<Output, std::io::Error> {
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.spawn_in_pod(pod, cmd)?.wait_with_output()
    }

    /// Runs `cmd` on `node` (its namespace and cgroup) to completion.
    pub fn run_on_node(&self, node: &NodeSpec, mut cmd: Command) -> Result<Output, std::io::Error> {
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.spawn_on_node(node, cmd)?.wait_with_output()
    }

    /// Gives the underlay one more address (a host that is no node: a
    /// hostile peer in the hardening tests), once.
    pub fn add_underlay_address(&self, ip: std::net::Ipv4Addr) -> std::io::Result<()> {
        netns::ensure_underlay_address(&self.topo.underlay_netns(), ip)
    }

    /// Runs `cmd` on the underlay (where the controller is) to completion.
    pub fn run_on_underlay(&self, mut cmd: Command) -> Result<Output, std::io::Error> {
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.spawn_on_underlay(cmd)?.wait_with_output()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(err) = sweep::teardown(self.topo.id) {
            // Drop cannot fail; say what is left and how to remove it.
            eprintln!("lacewing lab: {err}; remove it with `lacewing lab down --all`");
        }
    }
}
