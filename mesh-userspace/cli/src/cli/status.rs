//! `lacewing status`: the controller's view of the nodes (applied version,
//! lag, connection, last NACK) and of its source, from its `/status`.

use crate::lab::{Lab, LabId};
use lacewing_controller::grpc::ControllerStatus;

pub fn run(controller: &str) -> anyhow::Result<i32> {
    let status = fetch(controller)?;
    println!(
        "controller {controller}: configuration version {}",
        status.version
    );
    if !status.source_error.is_empty() {
        println!(
            "source error (the last good configuration stays in force): {}",
            status.source_error
        );
    }
    println!(
        "{:<16} {:<10} {:>16} {:>10}  LAST NACK",
        "NODE", "STREAM", "APPLIED", "LAG"
    );
    for n in &status.nodes {
        let lag = if n.applied_version == status.version {
            "in sync"
        } else {
            "behind"
        };
        let nack = if n.last_nack.is_empty() {
            "-".to_owned()
        } else {
            format!("version {}: {}", n.last_nack_version, n.last_nack)
        };
        let stream = if n.connected { "connected" } else { "gone" };
        println!(
            "{:<16} {:<10} {:>16} {:>10}  {nack}",
            n.node, stream, n.applied_version, lag
        );
    }
    Ok(0)
}

fn fetch(addr: &str) -> anyhow::Result<ControllerStatus> {
    super::get_json(addr, "/status", "the controller")
}

/// Runs `lacewing status` again on the lab's underlay, where its controller
/// is reachable (the machine's own namespace has no route into the lab).
pub fn run_in_lab(lab: Option<LabId>) -> anyhow::Result<i32> {
    let lab = Lab::open(super::lab::resolve(lab)?)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["status", "--controller", &lab.controller_status_addr()]);
    let mut child = lab.spawn_on_underlay(cmd)?;
    let status = child.child_mut().wait()?;
    Ok(status.code().unwrap_or(1))
}
