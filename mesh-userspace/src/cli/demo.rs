//! `lacewing demo`: the main job, end to end, in a fresh lab.
//!
//! ```text
//!   n0-p0 ──curl──▶ n1-p0:8080 (nginx)      counted by n0's daemon
//!   n1-p1 ──curl──▶ n1-p0:8080              counted by n1's daemon
//!   n0-p1 ──curl──▶ n0-p0:9090 (nginx, v6)  counted by n0's daemon
//! ```

use std::{process::Command, time::Duration};

use anyhow::Context as _;

use super::{maps::conn_table, sibling_binary};
use crate::lab::{Lab, PodSpec, sweep};

pub fn run() -> anyhow::Result<()> {
    let node_bin = sibling_binary("lacewing-node")?;
    step("bringing up a lab: 2 nodes, 2 pods each");
    let lab = Lab::new(2, 2)?;
    println!("lab {} is up", lab.id().prefix());
    let id = lab.id();
    let result = run_in(&lab, &node_bin);
    step("tearing down");
    lab.down()?;
    let left = sweep::leftovers(id)?;
    anyhow::ensure!(left.is_empty(), "the lab left resources behind: {left:?}");
    println!("lab {} removed; nothing left behind", id.prefix());
    result
}

fn run_in(lab: &Lab, node_bin: &std::path::Path) -> anyhow::Result<()> {
    let (n0, n1) = (lab.node("n0")?, lab.node("n1")?);
    step("starting lacewing-node on each node (attached at the node's cgroup)");
    let mut daemons = Vec::new();
    for node in [&n0, &n1] {
        daemons.push(lab.start_node_daemon(node, node_bin)?);
    }
    step("starting nginx in n1-p0 (:8080) and n0-p0 (:9090)");
    let (n0p0, n0p1, n1p0, n1p1) = (
        lab.pod("n0-p0")?,
        lab.pod("n0-p1")?,
        lab.pod("n1-p0")?,
        lab.pod("n1-p1")?,
    );
    let _web = lab.start_http_server(&n1p0, 8080, "hello from n1-p0")?;
    let _api = lab.start_http_server(&n0p0, 9090, "hello from n0-p0")?;

    step("making connections from pods");
    for _ in 0..3 {
        curl(lab, &n0p0, &format!("http://{}:8080/", n1p0.ip4()))?;
    }
    for _ in 0..2 {
        curl(lab, &n1p1, &format!("http://{}:8080/", n1p0.ip4()))?;
    }
    curl(lab, &n0p1, &format!("http://[{}]:9090/", n0p0.ip6()))?;

    for node in [&n0, &n1] {
        step(&format!("what the kernel counted on node {}", node.name()));
        print!("{}", conn_table(&lab.node_bpffs_root(node))?);
    }
    let map = lab
        .node_bpffs_root(&n0)
        .join("maps")
        .join(mesh_common::names::MAP_CONN_BY_PORT);
    step(&format!("bpftool map dump pinned {}", map.display()));
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&map)
        .output()
        .context("running bpftool (install it with `cargo xtask setup`)")?;
    print!("{}", String::from_utf8_lossy(&dump.stdout));

    step("stopping the daemons (SIGTERM: programs detach, pins removed)");
    for mut daemon in daemons {
        let status = daemon.terminate(Duration::from_secs(5))?;
        println!("lacewing-node on {} exited: {status}", daemon.place());
        anyhow::ensure!(
            status.success(),
            "lacewing-node on {} failed",
            daemon.place()
        );
    }
    Ok(())
}

fn curl(lab: &Lab, from: &PodSpec, url: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", url]);
    let out = lab.run_in_pod(from, cmd)?;
    anyhow::ensure!(
        out.status.success(),
        "curl {url} from {} failed: {}",
        from.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{:<6} -> {url:<28} {}",
        from.name(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}
