//! `lacewing-node` on lab nodes: the connect4/connect6 programs count the
//! connections made below the node's cgroup, and only those.
//!
//! ```text
//!   n0-p0 ──tcp──▶ n1-p0:8080 (x3 IPv4, x1 IPv6), udp ──▶ n1-p0:5353   counted by n0
//!   n1-p0 ──tcp──▶ n0-p0:9090 (x2)                                     counted by n1
//! ```

use std::{collections::BTreeMap, net::IpAddr, process::Command, time::Duration};

use lacewing_node::maps::ConnCounters;
use lacewing_tests::{bin, curl, new_lab, run_in, url};
use mesh_common::{conn::ConnKey, family, names};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn counts(root: &std::path::Path) -> BTreeMap<ConnKey, u64> {
    ConnCounters::open(root)
        .expect("open the pinned counter map")
        .snapshot()
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn a_node_counts_connections_from_its_own_pods_only() {
    let lab = new_lab(2, 1);
    let (n0, n1) = (lab.node("n0").unwrap(), lab.node("n1").unwrap());
    let (p0, p1) = (lab.pod("n0-p0").unwrap(), lab.pod("n1-p0").unwrap());
    let mut d0 = lab.start_node_daemon(&n0, &bin("lacewing-node")).unwrap();
    let _d1 = lab.start_node_daemon(&n1, &bin("lacewing-node")).unwrap();
    let _web = lab.start_http_server(&p1, 8080, "web").unwrap();
    let _api = lab.start_http_server(&p0, 9090, "api").unwrap();

    for _ in 0..3 {
        assert_eq!(
            curl(&lab, &p0, &url(IpAddr::V4(p1.ip4()), 8080)).as_deref(),
            Ok("web")
        );
    }
    assert_eq!(
        curl(&lab, &p0, &url(IpAddr::V6(p1.ip6()), 8080)).as_deref(),
        Ok("web")
    );
    // bash connects a UDP socket for /dev/udp.
    let udp = run_in(
        &lab,
        &p0,
        "bash",
        &["-c", &format!("echo hi > /dev/udp/{}/5353", p1.ip4())],
    );
    assert!(udp.status.success(), "{udp:?}");
    for _ in 0..2 {
        assert_eq!(
            curl(&lab, &p1, &url(IpAddr::V4(p0.ip4()), 9090)).as_deref(),
            Ok("api")
        );
    }

    let on_n0 = counts(&lab.node_bpffs_root(&n0));
    let expected_n0 = BTreeMap::from([
        (ConnKey::new(8080, family::INET, TCP), 3),
        (ConnKey::new(8080, family::INET6, TCP), 1),
        (ConnKey::new(5353, family::INET, UDP), 1),
    ]);
    assert_eq!(
        on_n0, expected_n0,
        "n0 must count exactly its own pod's connects"
    );
    let on_n1 = counts(&lab.node_bpffs_root(&n1));
    assert_eq!(
        on_n1,
        BTreeMap::from([(ConnKey::new(9090, family::INET, TCP), 2)]),
        "n1 counts only n1-p0"
    );

    // The real bpftool prints the pinned map with its field names.
    let map = lab
        .node_bpffs_root(&n0)
        .join("maps")
        .join(names::MAP_CONN_BY_PORT);
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let entries: serde_json::Value =
        serde_json::from_slice(&dump.stdout).expect("bpftool -j prints JSON");
    let formatted: Vec<&serde_json::Value> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.get("formatted").unwrap_or(e))
        .collect();
    let tcp4_8080 = formatted
        .iter()
        .find(|e| {
            e["key"]["dst_port"] == 8080 && e["key"]["family"] == 2 && e["key"]["protocol"] == 6
        })
        .unwrap_or_else(|| {
            panic!("no dst_port/family/protocol fields in bpftool's dump: {entries}")
        });
    let total: u64 = tcp4_8080["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["value"]["connects"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total, 3,
        "bpftool's per-CPU `connects` values add up to the connects made"
    );

    // Attached at the node's cgroup, as bpftool sees it.
    let cgroup = lab.node_cgroup(&n0);
    let show = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroup)
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("connect4") && show.contains("lw_connect4") && show.contains("lw_connect6"),
        "{show}"
    );

    // SIGTERM: clean exit, programs detached, pins removed; traffic unaffected.
    let status = d0.terminate(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "lacewing-node exited with {status}");
    let show = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroup)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&show.stdout).contains("lw_connect"),
        "programs still attached after SIGTERM"
    );
    assert!(
        !lab.node_bpffs_root(&n0).exists(),
        "pins left after SIGTERM"
    );
    assert_eq!(
        curl(&lab, &p0, &url(IpAddr::V4(p1.ip4()), 8080)).as_deref(),
        Ok("web")
    );
}

#[test]
fn the_node_daemon_rejects_a_cgroup_root_that_is_not_a_cgroup() {
    let out = Command::new(bin("lacewing-node"))
        .args(["--cgroup-root", "/tmp", "--node-name", "x"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/tmp is not a cgroup v2 directory"),
        "{stderr}"
    );
}
