//! `lacewing status`: the controller's view of the nodes (applied version,
//! lag, connection, last NACK) and of its source, from its `/status`.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::Context as _;

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

/// GET /status over plain HTTP/1.0 (read-only; no client library needed).
fn fetch(addr: &str) -> anyhow::Result<ControllerStatus> {
    let mut stream = TcpStream::connect(addr)
        .with_context(|| format!("connecting to the controller at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the controller's reply has no body")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "the controller answered: {head}"
    );
    serde_json::from_str(body).context("the controller's /status is not what this CLI expects")
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
