//! Network namespaces and links of a lab, made with iproute2 in batch mode (one
//! `ip` process per namespace, not one per command).
//!
//! Every link is created inside a lab namespace and its peer is created directly
//! in the other lab namespace (`peer name eth0 netns ...`), so nothing ever
//! appears in the machine's own network namespace; the pods' links are the
//! CNI plugins' (`super::cni`), run in the node's namespace. No namespace gets an address
//! or route toward the machine: the underlay bridge has no uplink, and nodes
//! route only to each other's pod CIDRs.

use std::{
    fmt::Write as _,
    fs, io,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::topology::{LabId, Topology};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file that names namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates and wires every namespace of the lab.
pub fn build(topo: &Topology) -> io::Result<()> {
    let all: Vec<String> = std::iter::once(topo.underlay_netns())
        .chain(topo.nodes().map(|n| n.netns()))
        .chain(topo.pods().map(|p| p.netns()))
        .collect();
    let mut adds = String::new();
    for name in &all {
        writeln!(adds, "netns add {name}").expect("write to String");
    }
    ip_batch(None, &adds)?;

    // Addresses are configured without duplicate address detection: it would
    // hold IPv6 addresses "tentative" for a second for no benefit in a lab.
    let mut sysctls = String::new();
    for name in &all {
        let forward = if topo.nodes().any(|n| &n.netns() == name) {
            " net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        } else {
            ""
        };
        writeln!(
            sysctls,
            "netns exec {name} sysctl -q -w net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0{forward}"
        )
        .expect("write to String");
    }
    ip_batch(None, &sysctls)?;

    ip_batch(Some(&topo.underlay_netns()), &underlay_script(topo))?;
    for node in topo.nodes() {
        ip_batch(Some(&node.netns()), &node_script(topo, node.index))?;
    }
    // The pods' links and addresses come from the CNI plugins
    // (`super::cni`), once the namespaces exist.
    Ok(())
}

fn underlay_script(topo: &Topology) -> String {
    let mut s = String::from("link set lo up\nlink add br0 type bridge\nlink set br0 up\n");
    for node in topo.nodes() {
        let (port, ns) = (node.underlay_if(), node.netns());
        let _ = writeln!(s, "link add {port} type veth peer name eth0 netns {ns}");
        let _ = writeln!(s, "link set {port} master br0");
        let _ = writeln!(s, "link set {port} up");
    }
    s
}

fn node_script(topo: &Topology, index: u8) -> String {
    let node = topo
        .nodes()
        .nth(usize::from(index))
        .expect("node in topology");
    let mut s = String::from("link set lo up\nlink set eth0 up\n");
    let _ = writeln!(s, "addr add {}/24 dev eth0", node.underlay_ip4());
    let _ = writeln!(s, "addr add {}/64 dev eth0 nodad", node.underlay_ip6());
    for other in topo.nodes().filter(|o| o.index != index) {
        let (net4, len4) = other.pod_cidr4();
        let (net6, len6) = other.pod_cidr6();
        let _ = writeln!(
            s,
            "route add {net4}/{len4} via {} dev eth0",
            other.underlay_ip4()
        );
        let _ = writeln!(
            s,
            "route add {net6}/{len6} via {} dev eth0",
            other.underlay_ip6()
        );
    }
    s
}

/// Gives the underlay bridge `ip`/24 (for the control plane), once.
pub fn ensure_underlay_address(underlay: &str, ip: std::net::Ipv4Addr) -> io::Result<()> {
    let out = Command::new("ip")
        .args(["-n", underlay, "-o", "addr", "show", "dev", "br0"])
        .output()?;
    if String::from_utf8_lossy(&out.stdout).contains(&format!("inet {ip}/")) {
        return Ok(());
    }
    ip_batch(Some(underlay), &format!("addr add {ip}/24 dev br0\n"))
}

/// Names of every namespace that belongs to lab `id`.
pub fn list(id: LabId) -> io::Result<Vec<String>> {
    Ok(list_all()?
        .into_iter()
        .filter(|name| LabId::from_resource_name(name) == Some(id))
        .collect())
}

/// Names of every lab namespace on the machine, whatever lab it belongs to.
pub fn list_all() -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if LabId::from_resource_name(&name).is_some() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Deletes the named namespaces; their links go with them.
pub fn delete(names: &[String]) -> io::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let script: String = names
        .iter()
        .map(|n| format!("netns delete {n}\n"))
        .collect();
    ip_batch(None, &script)
}

/// Runs `ip [-n netns] -batch -` with `script` on stdin. `-force` keeps going
/// past a failing line so one error does not leave the rest undone; the
/// failure is still reported.
fn ip_batch(netns: Option<&str>, script: &str) -> io::Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("running `ip`: {err} (is iproute2 installed? run `cargo xtask setup`)"),
        )
    })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "`ip{} -batch` failed: {}\n--- script ---\n{script}",
        netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
