//! The local lab: reachability, isolation from the machine, cleanup, and the CLI.
//!
//! ```text
//!            lw-<id>-ul (bridge br0)
//!             /                 \
//!      n0 10.200.0.1        n1 10.200.0.2
//!      /        \           /        \
//!  n0-p0      n0-p1     n1-p0      n1-p1
//! 10.244.0.10 .0.11   10.244.1.10  .1.11
//! ```

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    process::{Command, Stdio},
    sync::{Arc, Barrier, Mutex},
    time::Duration,
};

use lacewing::lab::{Lab, LabId, sweep};
use lacewing_tests::{alive, assert_gone, bin, curl, new_lab, ping, run_in, url};

#[test]
fn pods_on_different_nodes_reach_each_other() {
    let lab = new_lab(2, 2);
    let target = lab.pod("n1-p1").unwrap();
    let _server = lab
        .start_http_server(&target, 8080, "served by n1-p1")
        .unwrap();
    for name in ["n0-p0", "n0-p1", "n1-p0"] {
        let client = lab.pod(name).unwrap();
        for ip in [IpAddr::V4(target.ip4()), IpAddr::V6(target.ip6())] {
            assert_eq!(
                curl(&lab, &client, &url(ip, 8080))
                    .unwrap_or_else(|e| panic!("{name} -> {ip}: {e}")),
                "served by n1-p1",
                "{name} -> {ip}"
            );
            assert!(ping(&lab, &client, ip), "{name} cannot ping {ip}");
        }
    }
    // And back the other way, across nodes.
    let n0p0 = lab.pod("n0-p0").unwrap();
    assert!(ping(&lab, &target, IpAddr::V4(n0p0.ip4())));
    assert!(ping(&lab, &target, IpAddr::V6(n0p0.ip6())));
}

/// Every global address of the machine's own interfaces (read-only listing).
fn machine_addresses() -> Vec<IpAddr> {
    let out = Command::new("ip")
        .args(["-j", "addr", "show"])
        .output()
        .expect("ip -j addr");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
    links
        .as_array()
        .expect("array of links")
        .iter()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|addr| addr["local"].as_str()?.parse::<IpAddr>().ok())
        // Loopback inside a pod is the pod's own; link-local needs an interface.
        .filter(|ip| !ip.is_loopback() && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect()
}

/// Connects to HOST PORT once (2 s at most) and says how it went.
const CONNECT: &str = r#"
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print("connected")
except socket.timeout:
    print("timeout")
except OSError as e:
    print({errno.ENETUNREACH: "unreachable", errno.EHOSTUNREACH: "unreachable",
           errno.ECONNREFUSED: "refused"}.get(e.errno, f"error {e}"))
"#;

#[test]
fn a_pod_cannot_reach_any_address_of_the_machine() {
    let addresses = machine_addresses();
    assert!(
        !addresses.is_empty(),
        "the machine has no global address to test against"
    );
    let lab = new_lab(2, 1);
    let pod = lab.pod("n0-p0").unwrap();
    for ip in &addresses {
        assert!(
            !ping(&lab, &pod, *ip),
            "pod n0-p0 reached the machine's address {ip}"
        );
        // A bare TCP connect: any answer at all (even one curl would
        // reject, such as an SSH banner) would mean the pod got out.
        let out = run_in(
            &lab,
            &pod,
            lacewing_tests::PYTHON,
            &["-c", CONNECT, &ip.to_string(), "22"],
        );
        let outcome = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            ["unreachable", "refused", "timeout"].contains(&outcome.as_str()),
            "pod n0-p0 connecting to the machine at {ip}:22: {outcome} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Structurally: no lab namespace routes anywhere but the lab.
    for node in lab.topology().nodes() {
        let out = Command::new("ip")
            .args(["-n", &node.netns(), "route", "show", "default"])
            .output()
            .unwrap();
        assert!(
            out.stdout.is_empty(),
            "node {} has a default route: {}",
            node.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = Command::new("ip")
        .args([
            "-n",
            &lab.topology().underlay_netns(),
            "-o",
            "addr",
            "show",
            "scope",
            "global",
        ])
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "the underlay has addresses: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn dropping_a_lab_removes_every_resource() {
    let lab = new_lab(2, 1);
    let id = lab.id();
    let node = lab.node("n0").unwrap();
    let daemon = lab.start_node_daemon(&node, &bin("lacewing-node")).unwrap();
    let server = lab
        .start_http_server(&lab.pod("n1-p0").unwrap(), 8080, "x")
        .unwrap();
    assert!(
        sweep::leftovers(id).unwrap().len() > 3,
        "the lab should exist before the drop"
    );
    drop(lab);
    assert_gone(id);
    assert!(!alive(daemon.pid()), "the node daemon outlived its lab");
    assert!(!alive(server.pid()), "nginx outlived its lab");
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let made = Arc::new(Mutex::new(None::<LabId>));
    let seen = Arc::clone(&made);
    let result = std::panic::catch_unwind(move || {
        let lab = new_lab(1, 1);
        *seen.lock().unwrap() = Some(lab.id());
        let _server = lab
            .start_http_server(&lab.pod("n0-p0").unwrap(), 8080, "x")
            .unwrap();
        panic!("a test failing in the middle of its work");
    });
    assert!(result.is_err(), "the closure was meant to panic");
    let id = made
        .lock()
        .unwrap()
        .expect("the lab was made before the panic");
    assert_gone(id);
}

#[test]
fn two_labs_side_by_side_do_not_collide() {
    let barrier = Arc::new(Barrier::new(2));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let lab = new_lab(2, 1);
                let body = format!("lab {}", lab.id());
                let server = lab.pod("n1-p0").unwrap();
                // Same pod names, addresses and port in both labs.
                let _nginx = lab.start_http_server(&server, 8080, &body).unwrap();
                barrier.wait();
                let got = curl(
                    &lab,
                    &lab.pod("n0-p0").unwrap(),
                    &url(IpAddr::V4(server.ip4()), 8080),
                );
                barrier.wait();
                (lab.id(), body, got)
            })
        })
        .collect();
    let results: Vec<_> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    assert_ne!(results[0].0, results[1].0, "two labs got the same id");
    for (id, body, got) in results {
        assert_eq!(
            got.as_deref(),
            Ok(body.as_str()),
            "lab {id} reached the other lab's server"
        );
        assert_gone(id);
    }
}

#[test]
fn the_lab_refuses_to_start_without_root_and_says_so() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    // A copy nobody can run wherever the checkout lives (CI may clone under a
    // folder only root can enter).
    let dir = std::env::temp_dir().join(format!("lacewing-nonroot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("lacewing");
    std::fs::copy(bin("lacewing"), &exe).unwrap();
    for path in [&dir, &exe] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A parallel test forking right after the copy can hold the new file's
    // write descriptor until it execs: exec then fails with ETXTBSY for a
    // moment, so retry briefly.
    let run = || {
        Command::new(&exe)
            .args(["lab", "up", "--nodes", "1", "--pods", "1"])
            .current_dir(&dir)
            .uid(65534)
            .gid(65534)
            .output()
    };
    let mut out = run();
    for _ in 0..50 {
        match &out {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(20));
                out = run();
            }
            _ => break,
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let out = out.expect("run lacewing as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lab up succeeded without root");
    assert!(
        stderr.contains("root") && stderr.contains("sudo"),
        "unclear message: {stderr}"
    );
}

/// Takes a lab that `lacewing lab up` left running down when dropped, so a
/// failed assertion does not leave it behind (the sweep also removes it once
/// this test process, its `--owner`, is gone).
struct UpLab(Option<LabId>);

impl Drop for UpLab {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            let _ = Command::new(bin("lacewing"))
                .args(["lab", "down", &id.prefix()])
                .output();
        }
    }
}

#[test]
fn the_cli_brings_a_lab_up_runs_in_it_and_takes_it_down() {
    let owner = std::process::id().to_string();
    let up = Command::new(bin("lacewing"))
        .args([
            "lab", "up", "--nodes", "1", "--pods", "2", "--owner", &owner,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "lab up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let id: LabId = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("lab ")?
                .split_whitespace()
                .next()?
                .strip_suffix(':')
        })
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no lab id in `lab up` output:\n{stdout}"));
    let mut guard = UpLab(Some(id));
    let lab_arg = id.prefix();

    let status = Command::new(bin("lacewing"))
        .args(["lab", "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&lab_arg) && status.contains("n0-p1") && status.contains("10.244.0.11"),
        "{status}"
    );
    // `lab up` also started the controller and the node daemon, subscribed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mesh = loop {
        let out = Command::new(bin("lacewing"))
            .args(["status", "--lab", &lab_arg])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("in sync") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        mesh.lines()
            .any(|l| l.starts_with("n0 ") && l.contains("connected") && l.contains("in sync")),
        "lacewing status --lab: {mesh}"
    );

    let exec = Command::new(bin("lacewing"))
        .args([
            "lab", "exec", "--lab", &lab_arg, "n0-p1", "--", "ip", "-4", "-o", "addr", "show",
            "dev", "eth0",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains("10.244.0.11/24"),
        "{exec:?}"
    );
    let code = Command::new(bin("lacewing"))
        .args([
            "lab", "exec", "--lab", &lab_arg, "n0-p0", "--", "sh", "-c", "exit 3",
        ])
        .status()
        .unwrap();
    assert_eq!(
        code.code(),
        Some(3),
        "lab exec must return the command's exit code"
    );
    let bad = Command::new(bin("lacewing"))
        .args(["lab", "exec", "--lab", &lab_arg, "n9-p0", "--", "true"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("n0-p0, n0-p1"),
        "an unknown pod should list the pods: {bad:?}"
    );

    guard.0 = None;
    let down = Command::new(bin("lacewing"))
        .args(["lab", "down", &lab_arg])
        .output()
        .unwrap();
    assert!(
        down.status.success() && String::from_utf8_lossy(&down.stdout).contains("removed lab"),
        "{down:?}"
    );
    assert_gone(id);
}

#[test]
fn a_lab_whose_owner_was_killed_is_swept() {
    let mut owner = Command::new(bin("lacewing"))
        .args([
            "lab",
            "up",
            "--nodes",
            "1",
            "--pods",
            "1",
            "--bare",
            "--foreground",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(owner.stdout.take().unwrap()).lines();
    let id: LabId = lines
        .find_map(|l| {
            l.ok()?
                .strip_prefix("lab ")?
                .split_whitespace()
                .next()?
                .strip_suffix(':')?
                .parse()
                .ok()
        })
        .expect("lab up prints the lab id");
    let lab = Lab::open(id).unwrap();
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    let sleeper = lab
        .spawn_in_pod(&lab.pod("n0-p0").unwrap(), sleeper)
        .unwrap();
    // The owner dies without any chance to clean up.
    owner.kill().unwrap();
    owner.wait().unwrap();
    assert!(
        !sweep::leftovers(id).unwrap().is_empty(),
        "the lab should outlive a SIGKILLed owner"
    );
    // The sweep every new lab runs takes it (this one, or a parallel test's).
    sweep::stale().unwrap();
    assert_gone(id);
    // Killed processes are reaped by their parent, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(sleeper.pid()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(sleeper.pid()),
        "a process of the swept lab is still running"
    );
}
