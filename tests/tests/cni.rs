//! Capture through the CNI chain, as on a cluster node: pods are wired by the
//! CNI reference plugins (ptp with host-local, loopback) run as a container
//! runtime runs them, with `lacewing-cni` chained last by its own install
//! step; the plugin hands each pod to the node daemon over its socket.
//!
//! ```text
//!   the mesh lab (tests/src/mesh_lab.rs), plus pods added on n0 after it runs:
//!   shop/fresh, shop/running (meshed, sa client)   default/other (not meshed)
//! ```

use std::{process::Command, time::Duration};

use lacewing::lab::{Lab, NodeSpec, Sandbox, cni};
use lacewing_tests::{
    PYTHON, bin,
    mesh_lab::{MeshLab, PORT, VIP, field, poll},
    tool,
};

const OUTBOUND_STREAMS: &str = "lacewing_tunnel_streams_opened_total{direction=\"outbound\"}";

/// A Pod object as the API server has it before the pod's network is up:
/// scheduled, with its UID, no address yet.
fn pending_pod(ns: &str, name: &str, sa: &str, uid: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}}}\nspec: {{nodeName: n0, serviceAccountName: {sa}}}\nstatus: {{phase: Pending}}\n"
    )
}

/// The same Pod once the kubelet reported its addresses.
fn running_pod(ns: &str, name: &str, sa: &str, uid: &str, result: &str) -> String {
    let ips: Vec<String> = addresses(result)
        .iter()
        .map(|ip| format!("{{ip: \"{ip}\"}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}}}\nspec: {{nodeName: n0, serviceAccountName: {sa}}}\nstatus: {{phase: Running, podIPs: [{}]}}\n",
        ips.join(", ")
    )
}

/// The addresses of a CNI result.
fn addresses(result: &str) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(result).unwrap();
    json["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| {
            ip["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn xfer_from(lab: &Lab, sandbox: &Sandbox, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(tool("xfer.py")).args(args);
    let out = lab.run_in_sandbox(sandbox, cmd).unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The TCP listeners in a sandbox, as `ss` lists them.
fn listeners(lab: &Lab, sandbox: &Sandbox) -> String {
    let mut cmd = Command::new("ss");
    cmd.args(["-Hltn"]);
    let out = lab.run_in_sandbox(sandbox, cmd).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn install(m: &MeshLab) -> NodeSpec {
    let n0 = m.lab.node("n0").unwrap();
    m.lab
        .install_cni_plugin(&n0, bin("lacewing-cni").parent().unwrap())
        .unwrap();
    n0
}

#[test]
fn a_pod_added_through_the_chain_is_captured_from_its_first_connection() {
    let m = MeshLab::new();
    let n0 = install(&m);
    // The install step chained the plugin last in the node's list.
    let list: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cni::conf_dir(&m.lab, &n0).join("10-lab.conflist")).unwrap(),
    )
    .unwrap();
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ptp", "lacewing-cni"]);

    let uid = "6f1c2a9e-4b7d-4e0a-9c3b-2d5e8f7a1b01";
    m.config(
        "fresh.yaml",
        Some(&pending_pod("shop", "fresh", "client", uid)),
    );
    let fresh = m.lab.sandbox(&n0, "shop", "fresh", uid).unwrap();
    let meshed_before = m.map_entries("n0", "LW_MESHED_NETNS");
    let streams_before = m.metric("n0", OUTBOUND_STREAMS);

    let added = cni::add(&m.lab, &n0, &fresh.pod).unwrap();
    // The result the runtime gets is the primary plugin's, byte for byte.
    assert_eq!(added.outputs.len(), 2, "{:?}", added.outputs);
    assert_eq!(added.outputs[1].0, "lacewing-cni");
    assert_eq!(added.outputs[1].1, added.outputs[0].1);
    // Captured before ADD returned: its first connection, made right away
    // (before the kubelet has reported the pod's addresses), goes through
    // the tunnel; the destination node admits it once the control plane
    // tells it whose address it came from.
    assert_eq!(m.map_entries("n0", "LW_MESHED_NETNS"), meshed_before + 1);
    let mut cmd = Command::new(PYTHON);
    cmd.arg(tool("xfer.py"))
        .args(["rr", VIP, "80", "first", "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let first = m.lab.spawn_in_sandbox(&fresh, cmd).unwrap();
    m.config(
        "fresh.yaml",
        Some(&running_pod("shop", "fresh", "client", uid, added.result())),
    );
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "replies=3");
    assert!(
        m.metric("n0", OUTBOUND_STREAMS) >= streams_before + 1.0,
        "the first connection did not go through the tunnel"
    );
    let listening = listeners(&m.lab, &fresh);
    assert!(listening.contains("127.0.0.1:15001"), "{listening}");

    // ADD again (the runtime retrying our link of the chain): the same
    // result, the pod captured once.
    let ptp_result = &added.outputs[0].1;
    let again = cni::run_plugin(
        &m.lab,
        &n0,
        &fresh.pod,
        "ADD",
        "lacewing-cni",
        Some(ptp_result),
    )
    .unwrap();
    assert_eq!(&again, ptp_result);
    assert_eq!(m.map_entries("n0", "LW_MESHED_NETNS"), meshed_before + 1);
    // CHECK passes for a captured pod; VERSION lists the spec versions.
    cni::check(&m.lab, &n0, &fresh.pod).unwrap();
    let version: serde_json::Value =
        serde_json::from_str(&cni::version(&m.lab, &n0, "lacewing-cni").unwrap()).unwrap();
    assert_eq!(version["cniVersion"], "1.0.0");
    for v in ["0.3.1", "0.4.0", "1.0.0"] {
        assert!(
            version["supportedVersions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == v),
            "{version}"
        );
    }

    // A pod in a namespace that is not meshed passes through untouched.
    let other_uid = "0d7e3b52-93c1-4f6a-8e2d-7b1c5a9f3e02";
    m.config(
        "other.yaml",
        Some(&pending_pod("default", "other", "default", other_uid)),
    );
    let other = m.lab.sandbox(&n0, "default", "other", other_uid).unwrap();
    let plain = cni::add(&m.lab, &n0, &other.pod).unwrap();
    assert_eq!(plain.outputs[1].1, plain.outputs[0].1);
    assert_eq!(m.map_entries("n0", "LW_MESHED_NETNS"), meshed_before + 1);
    let streams = m.metric("n0", OUTBOUND_STREAMS);
    let web1 = m.lab.pod("n1-p1").unwrap().ip4().to_string();
    let out = xfer_from(&m.lab, &other, &["rr", &web1, PORT, "plain", "2"]).unwrap();
    assert_eq!(out, "replies=2");
    assert_eq!(
        m.metric("n0", OUTBOUND_STREAMS),
        streams,
        "the unmeshed pod was tunnelled"
    );
    assert!(!listeners(&m.lab, &other).contains(":15001"));

    // DEL: the pod's capture is off (its kernel entry gone, its listeners
    // closed) when DEL returns; DEL twice is harmless.
    cni::del(&m.lab, &n0, &fresh.pod).unwrap();
    assert_eq!(m.map_entries("n0", "LW_MESHED_NETNS"), meshed_before);
    let listening = listeners(&m.lab, &fresh);
    assert!(!listening.contains(":15001"), "{listening}");
    cni::del(&m.lab, &n0, &fresh.pod).unwrap();
    cni::del(&m.lab, &n0, &other.pod).unwrap();
    // The plugin logged each call where the operator finds it.
    let log = std::fs::read_to_string(cni::node_dir(&m.lab, &n0).join("lacewing-cni.log")).unwrap();
    assert!(
        log.contains("ADD shop/fresh: {\"answer\":\"captured\"}"),
        "{log}"
    );
    assert!(
        log.contains("ADD default/other: {\"answer\":\"not-meshed\"}"),
        "{log}"
    );
    assert!(
        log.contains("DEL shop/fresh: {\"answer\":\"released\"}"),
        "{log}"
    );
}

#[test]
fn running_pods_are_found_again_at_restart_and_meshed_pods_wait_while_the_daemon_is_down() {
    let mut m = MeshLab::new();
    let n0 = install(&m);
    let uid = "3a9b7c15-2e4d-4f80-b6a1-9d0c8e7f6a03";
    m.config(
        "running.yaml",
        Some(&pending_pod("shop", "running", "client", uid)),
    );
    let running = m.lab.sandbox(&n0, "shop", "running", uid).unwrap();
    let added = cni::add(&m.lab, &n0, &running.pod).unwrap();
    // The kubelet reports the pod's addresses; its container runs.
    m.config(
        "running.yaml",
        Some(&running_pod(
            "shop",
            "running",
            "client",
            uid,
            added.result(),
        )),
    );
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    let _app = m.lab.spawn_in_sandbox(&running, sleeper).unwrap();
    let meshed = m.map_entries("n0", "LW_MESHED_NETNS");

    // The daemon dies.
    let mut daemon = m.nodes.remove(0);
    daemon.signal(libc::SIGKILL).unwrap();
    poll("n0's daemon is gone", Duration::from_secs(5), || {
        daemon.try_wait().unwrap().map(|_| ())
    });
    // A pod of a meshed namespace cannot start uncaptured: ADD fails with
    // "try again later" (the kubelet retries and deletes the sandbox).
    let late_uid = "c4e1f7a2-58b3-4d9e-a0f6-1b2c3d4e5f04";
    m.config(
        "late.yaml",
        Some(&pending_pod("shop", "late", "client", late_uid)),
    );
    let late = m.lab.sandbox(&n0, "shop", "late", late_uid).unwrap();
    let err = cni::add(&m.lab, &n0, &late.pod).unwrap_err();
    assert_eq!(err.plugin, "lacewing-cni", "{err}");
    assert_eq!(err.code(), Some(11), "{err}");
    assert!(err.output.contains("namespace is meshed"), "{err}");
    cni::del(&m.lab, &n0, &late.pod).unwrap();
    // A pod outside the mesh never depends on the daemon.
    let free_uid = "e8d2a6c4-1f3b-4a5d-9c7e-2b4d6f8a0c05";
    m.config(
        "free.yaml",
        Some(&pending_pod("default", "free", "default", free_uid)),
    );
    let free = m.lab.sandbox(&n0, "default", "free", free_uid).unwrap();
    let passed = cni::add(&m.lab, &n0, &free.pod).unwrap();
    assert_eq!(passed.outputs[1].1, passed.outputs[0].1);

    // A new daemon, no new ADD: the running pod is found by its process
    // (its cgroup names its UID) and meshed again.
    let args = lacewing_tests::subscribed_node_args(&m.lab, &n0, true);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let restarted = m
        .lab
        .start_node_daemon_with(&n0, &bin("lacewing-node"), &args)
        .unwrap();
    m.nodes.insert(0, restarted);
    poll(
        "the running pod is captured again",
        Duration::from_secs(20),
        || {
            listeners(&m.lab, &running)
                .contains("127.0.0.1:15001")
                .then_some(())
        },
    );
    assert_eq!(m.map_entries("n0", "LW_MESHED_NETNS"), meshed);
    let streams = m.metric("n0", OUTBOUND_STREAMS);
    let out = xfer_from(&m.lab, &running, &["rr", VIP, "80", "again", "3"]).unwrap();
    assert_eq!(field(&out, "replies"), "3");
    assert!(m.metric("n0", OUTBOUND_STREAMS) > streams);
    // And the daemon answers the plugin again.
    cni::check(&m.lab, &n0, &running.pod).unwrap();
}

/// The bridge plugin's network list as a kubeadm install guide writes it
/// (address masquerading off: the lab's nodes have no way out to hide).
const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

#[test]
fn the_install_step_chains_into_a_bridge_list_that_a_runtime_runs_and_restores_it() {
    let lab = lacewing_tests::new_lab(1, 0);
    let n0 = lab.node("n0").unwrap();
    let conf = cni::conf_dir(&lab, &n0);
    // The primary CNI's file sorts first: the runtime (and the install
    // step) use it. host-local keeps its leases inside the lab.
    let bridge = BRIDGE.replace(
        "\"type\": \"host-local\",",
        &format!(
            "\"type\": \"host-local\", \"dataDir\": \"{}\",",
            cni::node_dir(&lab, &n0).join("bridge-ipam").display()
        ),
    );
    let file = conf.join("05-bridge.conflist");
    std::fs::write(&file, &bridge).unwrap();
    let bins = bin("lacewing-cni");
    lab.install_cni_plugin(&n0, bins.parent().unwrap()).unwrap();
    let chained: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(chained["name"], "k8s-pod-network");
    assert_eq!(chained["cniVersion"], "1.0.0");
    let types: Vec<&str> = chained["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge", "portmap", "lacewing-cni"]);
    assert!(cni::bin_dir(&lab).join("lacewing-cni").is_file());
    // Installing again changes nothing.
    let once = std::fs::read_to_string(&file).unwrap();
    lab.install_cni_plugin(&n0, bins.parent().unwrap()).unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), once);

    // The runtime runs the chained list: the real bridge, portmap and our
    // plugin (no daemon on this node: the pod passes through).
    let uid = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c06";
    let pod = lab.sandbox(&n0, "default", "bridged", uid).unwrap();
    let added = cni::add(&lab, &n0, &pod.pod).unwrap();
    let names: Vec<&str> = added.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["bridge", "portmap", "lacewing-cni"]);
    assert_eq!(added.outputs[2].1, added.outputs[1].1);
    assert_eq!(addresses(added.result()), ["10.244.0.2"]);
    cni::del(&lab, &n0, &pod.pod).unwrap();

    // Removal: the primary's own bytes, and no binary left behind.
    let out = Command::new(&bins)
        .arg("uninstall")
        .arg("--bin-dir")
        .arg(cni::bin_dir(&lab))
        .arg("--conf-dir")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), bridge);
    assert!(!cni::bin_dir(&lab).join("lacewing-cni").exists());
    assert!(
        std::fs::read_dir(&conf)
            .unwrap()
            .filter_map(Result::ok)
            .all(|e| !e.file_name().to_string_lossy().contains("lacewing")),
        "nothing of ours is left in the configuration folder"
    );

    // As the chart runs it: installed, kept in place while the primary CNI
    // rewrites its file, and removed when the installer is stopped.
    let mut installer = Command::new(&bins);
    installer
        .arg("install")
        .arg("--bin-dir")
        .arg(cni::bin_dir(&lab))
        .arg("--conf-dir")
        .arg(&conf)
        .arg("--socket")
        .arg(lab.cni_socket(&n0))
        .stderr(std::process::Stdio::piped());
    let mut installer = installer.spawn().unwrap();
    let chained_again = || {
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("\"lacewing-cni\"")
            .then_some(())
    };
    poll(
        "the installer chains the plugin",
        Duration::from_secs(10),
        chained_again,
    );
    let rewritten = bridge.replace("10.244.0.0/24", "10.244.7.0/24");
    std::fs::write(&file, &rewritten).unwrap();
    poll(
        "the installer chains the plugin into the rewritten file",
        Duration::from_secs(10),
        chained_again,
    );
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("10.244.7.0/24")
    );
    // SAFETY: a plain kill(2) of the child this test started.
    assert_eq!(
        unsafe { libc::kill(installer.id() as i32, libc::SIGTERM) },
        0
    );
    let out = poll("the installer stops", Duration::from_secs(10), || {
        installer.try_wait().unwrap()
    });
    assert!(out.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), rewritten);
    assert!(!cni::bin_dir(&lab).join("lacewing-cni").exists());
}
