//! Upgrading the node daemon under load: a new `lacewing-node` takes the
//! running one's listeners over its handoff socket, and the old one drains.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)      namespace default
//!   n0-p0 client (sa client)                        n0-p1 plain (not meshed)
//!   n1-p0 web (sa web): xfer.py on 9000
//!   n1-p1 web (sa web): httpd.py on 8080, and a client of n1-p0
//!   Service shop/web 10.96.0.20:80 -> n1-p0:9000
//! ```

use mesh_common::names;
use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use lacewing::lab::LabProcess;
use lacewing_tests::{
    PYTHON,
    mesh_lab::{MeshLab, VIP, field, poll},
    run_in, tool,
};

const HTTP_PORT: u16 = 8080;

/// The processes listening on `ports` in the network namespace `ss` runs in.
fn listening_pids(out: &std::process::Output, ports: &[u16]) -> BTreeSet<u32> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pids = BTreeSet::new();
    for line in text.lines() {
        let Some(local) = line.split_whitespace().nth(3) else {
            continue;
        };
        let port = local.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        if !port.is_some_and(|p| ports.contains(&p)) {
            continue;
        }
        for part in line.split("pid=").skip(1) {
            if let Ok(pid) = part.split(',').next().unwrap_or("").parse() {
                pids.insert(pid);
            }
        }
    }
    pids
}

/// Every mesh listener of node `index` (its own ports, and its meshed
/// pods') is held by `pid` alone.
fn assert_only_listener(m: &MeshLab, index: usize, pid: u32, pods: &[&str]) {
    let node = m.lab.topology().nodes().nth(index).unwrap();
    let mut ss = Command::new("ss");
    ss.arg("-Hltnp");
    let out = m.lab.run_on_node(&node, ss).unwrap();
    assert_eq!(
        listening_pids(&out, &[15008, 15020, 15000]),
        BTreeSet::from([pid]),
        "{}'s ports after the handoff:\n{}",
        node.name(),
        String::from_utf8_lossy(&out.stdout)
    );
    for pod in pods {
        let out = run_in(&m.lab, &m.lab.pod(pod).unwrap(), "ss", &["-Hltnp"]);
        assert_eq!(
            listening_pids(&out, &[15001, 15006]),
            BTreeSet::from([pid]),
            "{pod}'s capture listeners after the handoff:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A number from h2load's summary: the word before `what` on the line
/// starting with `line`.
fn h2load_count(text: &str, line: &str, what: &str) -> u64 {
    let summary = text
        .lines()
        .find(|l| l.starts_with(line))
        .unwrap_or_else(|| panic!("no `{line}` in h2load's output:\n{text}"));
    let words: Vec<&str> = summary
        .split([' ', ','])
        .filter(|w| !w.is_empty())
        .collect();
    let at = words
        .iter()
        .position(|w| *w == what)
        .unwrap_or_else(|| panic!("no `{what}` in `{summary}`"));
    words[at - 1].parse().unwrap()
}

#[test]
fn five_upgrades_of_each_daemon_under_load_drop_nothing_and_each_old_daemon_exits_once_idle() {
    // The same-node pair goes through the daemon (no fast path), and no
    // connection is cut by a drain timeout during the test.
    let mut m = MeshLab::build_with(&[], true, &|_, _| {
        ["--fast-path", "false", "--drain-timeout", "2m"]
            .map(String::from)
            .to_vec()
    });
    let _httpd = m.serve_tool("n1-p1", "httpd.py", &[&HTTP_PORT.to_string()], HTTP_PORT);
    let web1 = m.lab.pod("n1-p1").unwrap().ip4().to_string();
    let seconds = 40;
    // HTTP/1.1 keep-alive across nodes at a fixed rate: 4 connections, 25
    // requests a second each.
    let mut h2load = {
        let mut cmd = Command::new("h2load");
        cmd.args(["--h1", "-c", "4", "--rps", "25", "-D", &seconds.to_string()])
            .arg(format!("http://{web1}:{HTTP_PORT}/"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        m.lab
            .spawn_in_pod(&m.lab.pod("n0-p0").unwrap(), cmd)
            .unwrap()
    };
    // A new cross-node connection for each request, 200 a second.
    let churn = {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(tool("churn.py"))
            .args([VIP, "80", "200", &seconds.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        m.lab
            .spawn_in_pod(&m.lab.pod("n0-p0").unwrap(), cmd)
            .unwrap()
    };
    // A same-node pair on n1, one request every 20 ms on one connection.
    let same_node = m.spawn_xfer("n1-p1", &["rr", VIP, "80", "same", "1800", "0.02"]);
    // 1 GiB across nodes at 30 MiB/s, checked by checksum both ways.
    let bulk = m.spawn_xfer("n0-p0", &["bulk", VIP, "80", "1024", "30"]);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (old_pin, new_pin) = (
        lacewing_tests::map_pin(names::MAP_SERVICES, 0),
        lacewing_tests::map_pin(names::MAP_SERVICES, 1),
    );
    let services_before = m.map_dump("n0", &old_pin);
    let mut old: Vec<LabProcess> = Vec::new();
    for round in 0..5 {
        for index in 0..2 {
            // n0's third upgrade and the ones after it change the service
            // maps' layout version.
            let extra: &[&str] = if index == 0 && round >= 2 {
                &[
                    "--fast-path",
                    "false",
                    "--drain-timeout",
                    "2m",
                    "--layout-bump",
                    "1",
                ]
            } else {
                &["--fast-path", "false", "--drain-timeout", "2m"]
            };
            old.push(m.upgrade_node(index, extra));
            let pods: &[&str] = if index == 0 {
                &["n0-p0"]
            } else {
                &["n1-p0", "n1-p1"]
            };
            assert_only_listener(&m, index, m.nodes[index].pid(), pods);
            if index == 0 && round == 2 {
                assert!(
                    !m.lab
                        .node_bpffs_root(&m.lab.node("n0").unwrap())
                        .join("maps")
                        .join(&old_pin)
                        .exists(),
                    "the old layout's pin is removed once the programs switched"
                );
                assert_eq!(
                    m.map_dump("n0", &new_pin),
                    services_before,
                    "the new layout's map holds the same services"
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let upgrades_took = started.elapsed();
    assert!(
        h2load.try_wait().unwrap().is_none(),
        "all ten upgrades happen under load (they took {upgrades_took:?})"
    );
    let out = h2load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let done = h2load_count(&text, "requests:", "succeeded");
    assert!(done >= 2000, "{text}");
    for what in ["failed", "errored", "timeout"] {
        assert_eq!(h2load_count(&text, "requests:", what), 0, "{what}: {text}");
    }
    assert_eq!(h2load_count(&text, "status codes:", "2xx"), done, "{text}");
    let out = churn.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = 200 * seconds;
    assert_eq!(
        text.trim(),
        format!("requests={requests} ok={requests} refused=0 resets=0 closed=0 timeouts=0 other=0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = same_node.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "replies=1800",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    MeshLab::assert_bulk_intact(bulk, 1024);
    // Every old daemon exits, 0, once its last connection ended.
    for mut daemon in old {
        let status = poll(
            "an old daemon exits after its drain",
            Duration::from_secs(20),
            || daemon.try_wait().unwrap(),
        );
        assert_eq!(status.code(), Some(0), "an old daemon's exit");
    }
}

#[test]
fn the_handoff_socket_refuses_a_peer_that_is_not_root_and_each_daemon_is_ready_only_while_it_serves()
 {
    let m = MeshLab::new();
    let node = m.lab.node("n0").unwrap();
    let socket = m.lab.node_run_dir(&node).join("handoff.sock");
    // Unlike what a takeover would send: hello, as a user who is not root.
    let client = |socket: &std::path::Path| {
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET)\ntry:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('connect', e.errno); sys.exit()\ntry:\n    s.send(b'{\"hello\":{\"protocol\":1,\"version\":\"x\",\"layout\":0}}')\nexcept BrokenPipeError:\n    pass\nprint(s.recv(65536).decode())\n";
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                PYTHON,
                "-c",
                script,
            ])
            .arg(socket)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    // The socket is root's alone.
    assert_eq!(client(&socket), format!("connect {}", libc::EACCES));
    // Opened to everyone by mistake, the daemon still refuses the peer.
    let dir = socket.parent().unwrap();
    for path in [dir, &socket] {
        let mut perms = std::fs::metadata(path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o777);
        std::fs::set_permissions(path, perms).unwrap();
    }
    assert_eq!(
        client(&socket),
        r#"{"refused":{"reason":"only root may take over"}}"#
    );
    // The daemon serves on, and a root successor still takes over; each
    // says it is ready in its own file (the chart's readiness probe), and
    // the old one's goes when it hands over.
    let mut m = m;
    let ready = |k: u32| m.lab.state_dir().join(format!("ready-{k}"));
    let (first, second) = (ready(1), ready(2));
    let _old = m.upgrade_node(0, &["--ready-file", first.to_str().unwrap()]);
    poll(
        "the new daemon's ready file",
        Duration::from_secs(5),
        || first.exists().then_some(()),
    );
    assert_eq!(
        field(
            &m.xfer("n0-p0", &["rr", VIP, "80", "after", "3"]),
            "replies"
        ),
        "3"
    );
    let _older = m.upgrade_node(0, &["--ready-file", second.to_str().unwrap()]);
    poll("the next one's ready file", Duration::from_secs(5), || {
        second.exists().then_some(())
    });
    assert!(
        !first.exists(),
        "the daemon that handed over is no longer ready"
    );
}

// A daemon from before per-cgroup sock_ops ran the program at the node's
// root, from a link pinned as `links/lw_sockops`. The daemon taking over
// runs its own program in that link until its capture has given the
// meshed pods their own links, then removes it: from then on an unmeshed
// pod's sockets run no sock_ops, and captured connections still work.
#[test]
fn an_older_daemons_sock_ops_link_at_the_node_root_is_retired_by_its_successor() {
    use std::os::fd::AsFd as _;
    let mut m = MeshLab::new();
    let n0 = m.lab.topology().nodes().next().unwrap();
    let links = lacewing_node::loader::links_dir(&m.lab.node_bpffs_root(&n0));
    let node_cgroup = m.lab.node_cgroup(&n0);
    // The running daemon's program, attached at the node's cgroup and
    // pinned as an older daemon pinned its link.
    let own = std::fs::read_dir(&links)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("lw_sockops_daemon_")
        })
        .expect("the daemon's own sock_ops link");
    let show = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(&own)
        .output()
        .unwrap();
    let link: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let prog_pin = m.lab.node_bpffs_root(&n0).join("test_sockops_prog");
    let pinned = Command::new("bpftool")
        .args(["prog", "pin", "id", &link["prog_id"].to_string()])
        .arg(&prog_pin)
        .output()
        .unwrap();
    assert!(pinned.status.success(), "{pinned:?}");
    let prog = lacewing_sys::os::bpf_obj_get(&prog_pin).unwrap();
    std::fs::remove_file(&prog_pin).unwrap();
    let cgroup = std::fs::File::open(&node_cgroup).unwrap();
    let root_link =
        lacewing_sys::os::bpf_link_create_cgroup(prog.as_fd(), cgroup.as_fd(), 3).unwrap();
    let legacy = links.join(names::SOCK_OPS_PROGRAM);
    lacewing_sys::os::bpf_obj_pin(root_link.as_fd(), &legacy).unwrap();
    drop(root_link);
    assert_eq!(lacewing_tests::sock_ops_at(&node_cgroup, false), 1);

    let _old = m.upgrade_node(0, &[]);
    poll("the root link retired", Duration::from_secs(10), || {
        (!legacy.exists() && lacewing_tests::sock_ops_at(&node_cgroup, false) == 0).then_some(())
    });
    let client = m.lab.pod("n0-p0").unwrap();
    let plain = m.lab.pod("n0-p1").unwrap();
    assert_eq!(
        lacewing_tests::sock_ops_at(&m.lab.pod_cgroup(&client), false),
        1
    );
    assert_eq!(
        lacewing_tests::sock_ops_at(&m.lab.pod_cgroup(&plain), true),
        0
    );
    assert_eq!(
        m.xfer("n0-p0", &["rr", VIP, "80", "after", "3"]),
        "replies=3"
    );
}
