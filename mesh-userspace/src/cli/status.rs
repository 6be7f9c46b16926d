//! `lacewing status`: the controller's view of the nodes (applied version,
//! lag, connection, last NACK) and of its source.

use crate::{
    lab::{Lab, LabId},
    proto::pb::{StatusRequest, config_service_client::ConfigServiceClient},
};

pub fn run(controller: &str) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        let mut client = ConfigServiceClient::connect(controller.to_owned())
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the controller at {controller}: {e}"))?;
        anyhow::Ok(client.status(StatusRequest {}).await?.into_inner())
    })?;
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
            "in sync".to_owned()
        } else {
            "behind".to_owned()
        };
        let nack = if n.last_nack.is_empty() {
            "-".to_owned()
        } else {
            format!("version {}: {}", n.last_nack_version, n.last_nack)
        };
        println!(
            "{:<16} {:<10} {:>16} {:>10}  {nack}",
            n.node,
            if n.connected { "connected" } else { "gone" },
            n.applied_version,
            lag
        );
    }
    Ok(0)
}

/// Runs `lacewing status` again on the lab's underlay, where its controller
/// is reachable (the machine's own namespace has no route into the lab).
pub fn run_in_lab(lab: Option<LabId>) -> anyhow::Result<i32> {
    let lab = Lab::open(super::lab::resolve(lab)?)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["status", "--controller", &lab.controller_url()]);
    let mut child = lab.spawn_on_underlay(cmd)?;
    let status = child.child_mut().wait()?;
    Ok(status.code().unwrap_or(1))
}
