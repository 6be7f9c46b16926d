//! Helpers for Lacewing's end-to-end tests: the real binaries, the real kernel
//! programs and real tools (curl, nginx, ping, bpftool) in the local lab.
//!
//! These tests need root. Where they cannot run they fail, saying why; they
//! never skip.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use lacewing::lab::{Lab, LabId, PodSpec, sweep};

/// A lab for a test; panics with what is missing when the machine cannot run
/// one (the lab tests must run in CI, as root).
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
        "{} is missing: build it first (`cargo build -p mesh-userspace --bins`; `cargo xtask test` does)",
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
