//! `lacewing lab up/status/exec/down`.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;
use clap::Subcommand;

use crate::lab::{Lab, LabId, Record, sweep};
use lacewing_sys::cgroup;

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create a lab and leave it running.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// Pods per node.
        #[arg(long, default_value_t = 2)]
        pods: u8,
        /// Only the namespaces and cgroups: no controller, no node daemons.
        #[arg(long)]
        bare: bool,
        /// Keep the lab only while this command runs: Ctrl-C or SIGTERM
        /// removes it (and if this process is killed, the next lab or
        /// `lacewing lab down --all` sweeps it).
        #[arg(long)]
        foreground: bool,
        /// Keep the lab only while process PID lives: once it is gone, the
        /// next lab (or `lacewing lab down --all`) sweeps it. What a test
        /// that brings a lab up with this command passes, so a test that
        /// dies leaves nothing behind.
        #[arg(long, value_name = "PID", conflicts_with = "foreground")]
        owner: Option<u32>,
    },
    /// List the labs on this machine with their nodes, pods and addresses.
    Status,
    /// Run a command in a pod (its network namespace and cgroup).
    Exec {
        /// Lab id; needed only when more than one lab is up.
        #[arg(long)]
        lab: Option<LabId>,
        /// Pod name, as in `n0-p1`.
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove a lab, or with --all every lab resource on the machine.
    Down {
        /// Lab id; may be left out when only one lab is up.
        lab: Option<LabId>,
        /// Remove every lab's resources (namespaces, cgroups, pins, records),
        /// including what killed processes left behind.
        #[arg(long, conflicts_with = "lab")]
        all: bool,
    },
}

pub fn run(cmd: LabCommand) -> anyhow::Result<i32> {
    match cmd {
        LabCommand::Up {
            nodes,
            pods,
            bare,
            foreground,
            owner,
        } => {
            let lab = Lab::new(nodes, pods)?;
            print!("{}", describe(lab.id(), &lab.record()));
            let mesh = if bare {
                None
            } else {
                let bin_dir = super::sibling_binary("lacewing-node")?
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_default();
                let mesh = lab.start_mesh(&bin_dir)?;
                println!(
                    "\ncontroller {} on the underlay, serving {}\nlacewing-node on every node, subscribed to it",
                    lab.controller_url(),
                    mesh.folder.display()
                );
                println!(
                    "Put Services and EndpointSlices (YAML) in that folder; see the nodes with: lacewing status --lab {}",
                    lab.id().prefix()
                );
                println!("Logs: {}", lab.state_dir().join("logs").display());
                Some(mesh)
            };
            if foreground {
                println!("\nlab {} is up until Ctrl-C", lab.id().prefix());
                std::io::Write::flush(&mut std::io::stdout())?;
                lacewing_sys::shutdown::block_until_signal()?;
                drop(mesh);
                lab.down()?;
                return Ok(0);
            }
            if let Some(mesh) = mesh {
                mesh.detach();
            }
            let id = lab.detach(owner)?;
            println!(
                "\nlab {} is up. Try: lacewing lab exec n0-p0 -- ip -br addr",
                id.prefix()
            );
            println!("Remove it with: lacewing lab down {}", id.prefix());
            Ok(0)
        }
        LabCommand::Status => {
            let labs = Lab::list()?;
            if labs.is_empty() {
                println!("no labs on this machine");
            }
            for record in labs {
                println!("{}", describe(record.topology.id, &record));
            }
            Ok(0)
        }
        LabCommand::Exec { lab, pod, command } => {
            let lab = Lab::open(resolve(lab)?)?;
            let pod = lab.pod(&pod)?;
            let mut cmd = Command::new(&command[0]);
            cmd.args(&command[1..]);
            let mut child = lab.spawn_in_pod(&pod, cmd)?;
            let status = child.child_mut().wait()?;
            Ok(status.code().unwrap_or(128 + status_signal(&status)))
        }
        LabCommand::Down { lab, all } => {
            let ids: Vec<LabId> = if all {
                sweep::all_ids()?.into_iter().collect()
            } else {
                vec![resolve(lab)?]
            };
            let mut failed = 0;
            for id in &ids {
                match sweep::teardown(*id) {
                    Ok(()) => println!("removed lab {}", id.prefix()),
                    Err(err) => {
                        eprintln!("error: {err}");
                        failed += 1;
                    }
                }
            }
            if ids.is_empty() {
                println!("no lab resources on this machine");
            }
            Ok(if failed == 0 { 0 } else { 1 })
        }
    }
}

fn status_signal(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status.signal().unwrap_or(0)
}

/// The lab meant when none is named: the only one there is.
pub fn resolve(lab: Option<LabId>) -> anyhow::Result<LabId> {
    if let Some(id) = lab {
        return Ok(id);
    }
    let ids = sweep::all_ids().context("listing labs")?;
    match ids.len() {
        1 => Ok(*ids.first().expect("one id")),
        0 => anyhow::bail!("no lab is up: start one with `lacewing lab up`"),
        _ => anyhow::bail!(
            "{} labs are up ({}): name one",
            ids.len(),
            ids.iter()
                .map(|i| i.prefix())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A readable description of a lab: nodes, pods, addresses, processes.
fn describe(id: LabId, record: &Record) -> String {
    let topo = &record.topology;
    let owner = match record.owner_pid {
        Some(pid) => format!("owned by pid {pid}"),
        None => "left up (lacewing lab down removes it)".to_owned(),
    };
    let mut out = format!(
        "lab {}: {} node(s), {} pod(s) per node, {owner}\n",
        id.prefix(),
        topo.nodes,
        topo.pods_per_node
    );
    let lab_cgroup = sweep::cgroup_dir(&record.cgroup2, id);
    for node in topo.nodes() {
        let (net4, len4) = node.pod_cidr4();
        let (net6, len6) = node.pod_cidr6();
        out.push_str(&format!(
            "  node {:<6} underlay {:<11} pods {net4}/{len4} {net6}/{len6}  netns {}\n",
            node.name(),
            node.underlay_ip4(),
            node.netns()
        ));
        for pod in node.pods(topo.pods_per_node) {
            let procs = cgroup::pids_below(&lab_cgroup.join(pod.cgroup()))
                .map(|p| p.len())
                .unwrap_or(0);
            out.push_str(&format!(
                "    pod {:<8} {:<13} {:<16} netns {:<20} processes {procs}\n",
                pod.name(),
                pod.ip4(),
                pod.ip6(),
                pod.netns()
            ));
        }
    }
    out
}
