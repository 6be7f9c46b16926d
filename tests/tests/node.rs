//! `lacewing-node` on lab nodes: the connect4/connect6 programs count the
//! connects to services made below the node's cgroup, and only those, per
//! service frontend; `lacewing maps conns` lists them.
//!
//! ```text
//!   n0-p0 ──tcp──▶ web (x3 IPv4, x1 IPv6), udp ──▶ web:53, tcp ──▶ n1-p0 (no service),
//!         tcp ──▶ 10.96.0.99 (in the service CIDR, no service: refused)          counted by n0
//!   n1-p0 ──tcp──▶ api (x2)                                                           counted by n1
//! ```

use std::{collections::BTreeMap, fs, net::IpAddr, process::Command, time::Duration};

use lacewing::lab::{Lab, NodeSpec};
use lacewing_node::maps;
use lacewing_tests::{ServiceYaml, bin, curl, new_lab, run_in, url};
use mesh_common::names;

const WEB_V4: &str = "10.96.0.10";
const WEB_V6: &str = "fd00:96::10";
const API_V4: &str = "10.96.0.20";

/// What `lacewing maps conns` shows: (frontend, protocol) to (connects,
/// refused), and the connects refused for want of a service.
type Conns = (BTreeMap<(String, String), (u64, u64)>, u64);

/// `lacewing maps conns` of `node`: (frontend, protocol) to (connects,
/// refused), and the connects refused for want of a service, as the user
/// reads them.
fn conns(lab: &Lab, node: &NodeSpec) -> Conns {
    let out = Command::new(bin("lacewing"))
        .args(["maps", "conns", "--bpffs-root"])
        .arg(lab.node_bpffs_root(node))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lacewing maps conns: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let [header, rows @ .., footer] = lines.as_slice() else {
        panic!("no table: {text}");
    };
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["FRONTEND", "PROTO", "CONNECTS", "REFUSED"],
        "{text}"
    );
    let rows = rows
        .iter()
        .map(|line| {
            let [frontend, proto, connects, refused] =
                line.split_whitespace().collect::<Vec<_>>()[..]
            else {
                panic!("not a row: {line}");
            };
            (
                (frontend.to_owned(), proto.to_owned()),
                (connects.parse().unwrap(), refused.parse().unwrap()),
            )
        })
        .collect();
    let unallocated = footer
        .strip_prefix("refused, no service at the address (in the service CIDRs): ")
        .unwrap_or_else(|| panic!("no footer: {text}"))
        .parse()
        .unwrap();
    (rows, unallocated)
}

/// Every row of `lacewing maps conns` for the two services, with the
/// counts `counted` gives the ones a node saw (all others are 0).
fn expected(counted: &[(&str, &str, u64)], unallocated: u64) -> Conns {
    let mut rows: BTreeMap<_, _> = [
        ("10.96.0.10:80", "TCP"),
        ("[fd00:96::10]:80", "TCP"),
        ("10.96.0.10:53", "UDP"),
        ("[fd00:96::10]:53", "UDP"),
        ("10.96.0.20:80", "TCP"),
        ("10.96.0.20:53", "UDP"),
    ]
    .iter()
    .map(|(f, p)| ((f.to_string(), p.to_string()), (0, 0)))
    .collect();
    for (f, p, n) in counted {
        rows.insert((f.to_string(), p.to_string()), (*n, 0));
    }
    (rows, unallocated)
}

#[test]
fn a_node_counts_connects_to_services_from_its_own_pods_only() {
    let lab = new_lab(2, 1);
    let (n0, n1) = (lab.node("n0").unwrap(), lab.node("n1").unwrap());
    let (p0, p1) = (lab.pod("n0-p0").unwrap(), lab.pod("n1-p0").unwrap());
    let web = ServiceYaml {
        name: "web",
        cluster_ips: &[WEB_V4.parse().unwrap(), WEB_V6.parse().unwrap()],
        target: 8080,
        backends: &[IpAddr::V4(p1.ip4()), IpAddr::V6(p1.ip6())],
        annotations: &[],
        affinity_timeout_s: None,
    };
    let api = ServiceYaml {
        name: "api",
        cluster_ips: &[API_V4.parse().unwrap()],
        target: 9090,
        backends: &[IpAddr::V4(p0.ip4())],
        annotations: &[],
        affinity_timeout_s: None,
    };
    let file = lab.state_dir().join("services.yaml");
    fs::write(&file, format!("{}---\n{}", web.render(), api.render())).unwrap();
    let args = [std::ffi::OsStr::new("--services"), file.as_os_str()];
    let mut d0 = lab
        .start_node_daemon_with(&n0, &bin("lacewing-node"), &args)
        .unwrap();
    let _d1 = lab
        .start_node_daemon_with(&n1, &bin("lacewing-node"), &args)
        .unwrap();
    for n in [&n0, &n1] {
        lab.wait_node_ready(n, Duration::from_secs(10)).unwrap();
    }
    let _web = lab.start_http_server(&p1, 8080, "web").unwrap();
    let _api = lab.start_http_server(&p0, 9090, "api").unwrap();

    for _ in 0..3 {
        assert_eq!(
            curl(&lab, &p0, &url(WEB_V4.parse().unwrap(), 80)).as_deref(),
            Ok("web")
        );
    }
    assert_eq!(
        curl(&lab, &p0, &url(WEB_V6.parse().unwrap(), 80)).as_deref(),
        Ok("web")
    );
    // Straight to the pod: no service, not counted.
    assert_eq!(
        curl(&lab, &p0, &url(IpAddr::V4(p1.ip4()), 8080)).as_deref(),
        Ok("web")
    );
    // bash connects a UDP socket for /dev/udp.
    let udp = run_in(
        &lab,
        &p0,
        "bash",
        &["-c", &format!("echo hi > /dev/udp/{WEB_V4}/53")],
    );
    assert!(udp.status.success(), "{udp:?}");
    // An address in the service CIDR that is no service: refused at once.
    assert!(curl(&lab, &p0, &url("10.96.0.99".parse().unwrap(), 80)).is_err());
    for _ in 0..2 {
        assert_eq!(
            curl(&lab, &p1, &url(API_V4.parse().unwrap(), 80)).as_deref(),
            Ok("api")
        );
    }

    assert_eq!(
        conns(&lab, &n0),
        expected(
            &[
                ("10.96.0.10:80", "TCP", 3),
                ("[fd00:96::10]:80", "TCP", 1),
                ("10.96.0.10:53", "UDP", 1),
            ],
            1
        ),
        "n0 must count exactly its own pod's connects"
    );
    assert_eq!(
        conns(&lab, &n1),
        expected(&[("10.96.0.20:80", "TCP", 2)], 0),
        "n1 counts only n1-p0's"
    );

    // The real bpftool prints the pinned counters with their field names;
    // the per-CPU values of all services add up to n0's five connects.
    let map = maps::pin_path(&lab.node_bpffs_root(&n0), names::MAP_SVC_STATS);
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
    let total: u64 = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.get("formatted").unwrap_or(e))
        .flat_map(|e| {
            e["values"]
                .as_array()
                .unwrap_or_else(|| panic!("no per-CPU values in bpftool's dump: {entries}"))
                .clone()
        })
        .map(|v| {
            v["value"]["connects"]
                .as_u64()
                .unwrap_or_else(|| panic!("no `connects` field in bpftool's dump: {entries}"))
        })
        .sum();
    assert_eq!(
        total, 5,
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

#[test]
fn senders_an_older_layout_switched_off_stay_off_in_the_new_layout() {
    // An older daemon's LW_SPLICE_OFF (layout 1: an LRU hash) with two
    // senders marked, as a previous version leaves it pinned.
    let lab = new_lab(1, 1);
    let node = lab.node("n0").unwrap();
    let dir = maps::maps_dir(&lab.node_bpffs_root(&node));
    fs::create_dir_all(&dir).unwrap();
    let old = dir.join(names::MAP_SPLICE_OFF);
    let bpftool = |args: &[&str]| {
        let out = Command::new("bpftool").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let old_path = old.to_str().unwrap();
    bpftool(&[
        "map",
        "create",
        old_path,
        "type",
        "lru_hash",
        "key",
        "48",
        "value",
        "1",
        "entries",
        "1024",
        "name",
        "LW_SPLICE_OFF",
    ]);
    // Keys: a netns cookie of 0, then addresses and ports; only the first
    // byte of each differs.
    let key = |first: u8| {
        let mut k = vec!["0".to_owned(); 48];
        k[8] = first.to_string();
        k
    };
    for first in [10, 11] {
        let mut args = vec!["map", "update", "pinned", old_path, "key"];
        let k = key(first);
        args.extend(k.iter().map(String::as_str));
        args.extend(["value", "1"]);
        bpftool(&args);
    }
    let _d = lab.start_node_daemon(&node, &bin("lacewing-node")).unwrap();
    // The old pin goes once the programs switched over; by then both marks
    // are in the new map.
    lacewing_tests::mesh_lab::poll(
        "the old LW_SPLICE_OFF pin is removed",
        Duration::from_secs(10),
        || (!old.exists()).then_some(()),
    );
    let new = dir.join(lacewing_tests::map_pin(names::MAP_SPLICE_OFF, 0));
    let dump: serde_json::Value = serde_json::from_str(&bpftool(&[
        "-j",
        "map",
        "dump",
        "pinned",
        new.to_str().unwrap(),
    ]))
    .unwrap();
    let mut firsts: Vec<u64> = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["formatted"]["key"]["local"][0]
                .as_u64()
                .unwrap_or_else(|| panic!("{e}"))
        })
        .collect();
    firsts.sort_unstable();
    // `local` is read as host-order words: the first byte is the low one.
    assert_eq!(firsts, [10, 11], "{dump}");
}
