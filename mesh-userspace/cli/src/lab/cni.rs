//! The lab's pod network: the CNI reference plugins (Debian's
//! `containernetworking-plugins`), run as a container runtime runs them.
//!
//! Each node has a configuration folder with one network list, `ptp` with
//! `host-local` addresses from the node's pod CIDRs: a veth per pod, the
//! node's gateway address on the node's end, a host route per pod (the same
//! routed pods as Calico's or Cilium's). Like containerd, the runtime brings
//! up the pod's loopback with the `loopback` plugin first, as a network of
//! its own. Each plugin runs in the node's network namespace and cgroup,
//! gets the `CNI_*` environment and its configuration on stdin, and the
//! result of the one before it as `prevResult`, bytes unchanged.
//!
//! The pods of the lab's topology are wired this way when the lab is made,
//! before any node daemon runs, so they are handed to the daemons through
//! the `--pod-netns-dir` folder. Pods added later ([`super::Lab::add_pod`])
//! go through the node's list with `lacewing-cni` chained last by its own
//! install step, exactly as on a cluster node.

use std::{
    fs,
    io::{self, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
};

use serde::Serialize;
use serde_json::{Map, Value, json, value::RawValue};

use super::{Lab, NodeSpec, PodSpec, netns};

/// Where Debian installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The node's network list, as its file names it.
const NETWORK_FILE: &str = "10-lab.conflist";

/// A pod as a runtime describes it to the plugins.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox's id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
}

/// What one ADD gave.
#[derive(Clone, Debug)]
pub struct Added {
    /// Each plugin of the list and what it printed, in order.
    pub outputs: Vec<(String, String)>,
}

impl Added {
    /// The list's result: what the last plugin printed.
    pub fn result(&self) -> &str {
        self.outputs.last().map_or("", |(_, out)| out)
    }
}

/// A plugin that failed: its CNI error, as it printed it.
#[derive(Debug, thiserror::Error)]
#[error("CNI plugin {plugin} {command} failed ({status}): {output}")]
pub struct PluginError {
    pub plugin: String,
    pub command: String,
    pub status: String,
    pub output: String,
}

impl PluginError {
    /// The spec's error code it printed.
    pub fn code(&self) -> Option<u64> {
        serde_json::from_str::<Value>(&self.output).ok()?["code"].as_u64()
    }
}

impl From<PluginError> for io::Error {
    fn from(e: PluginError) -> Self {
        io::Error::other(e.to_string())
    }
}

/// The node's CNI folders: `<state>/cni/<node>/{net.d,ipam,results}`.
pub fn node_dir(lab: &Lab, node: &NodeSpec) -> PathBuf {
    lab.state_dir().join("cni").join(node.name())
}

/// The node's configuration folder (what `lacewing-cni install` edits).
pub fn conf_dir(lab: &Lab, node: &NodeSpec) -> PathBuf {
    node_dir(lab, node).join("net.d")
}

/// The folder the lab's runtime looks for plugins in first (then
/// [`REFERENCE_PLUGINS`]), where `lacewing-cni install` puts its binary.
pub fn bin_dir(lab: &Lab) -> PathBuf {
    lab.state_dir().join("cni").join("bin")
}

/// Writes each node's network list.
pub fn configure(lab: &Lab) -> io::Result<()> {
    for node in lab.topology().nodes() {
        let dir = node_dir(lab, &node);
        fs::create_dir_all(dir.join("net.d"))?;
        fs::create_dir_all(dir.join("results"))?;
        let (net4, len4) = node.pod_cidr4();
        let (net6, len6) = node.pod_cidr6();
        let list = json!({
            "cniVersion": "1.0.0",
            "name": "lab-pods",
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "ranges": [
                        [{"subnet": format!("{net4}/{len4}"), "gateway": node.gateway4().to_string()}],
                        [{"subnet": format!("{net6}/{len6}"), "gateway": node.gateway6().to_string()}],
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                },
            }],
        });
        let mut text = serde_json::to_string_pretty(&list).expect("JSON writes");
        text.push('\n');
        fs::write(dir.join("net.d").join(NETWORK_FILE), text)?;
    }
    Ok(())
}

/// Wires the topology's pods, with the addresses the topology gives them
/// (asked of `host-local` as a runtime passes `ips`).
pub fn wire_topology(lab: &Lab) -> io::Result<()> {
    for pod in lab.topology().pods() {
        let r = topology_pod(lab, &pod);
        let ips = [pod.ip4().to_string(), pod.ip6().to_string()];
        add_with(lab, &pod.node, &r, Some(&ips))?;
    }
    Ok(())
}

/// How the runtime names a topology pod.
pub fn topology_pod(lab: &Lab, pod: &PodSpec) -> PodRef {
    PodRef {
        namespace: "lab".to_owned(),
        name: pod.name(),
        uid: pod.uid(),
        container_id: format!("{}-{}", lab.id().prefix(), pod.name()),
        netns: netns::path(&pod.netns()),
    }
}

/// `ADD`: the loopback network, then the node's list. The list's result is
/// kept for `DEL` and `CHECK`, as libcni keeps it.
pub fn add(lab: &Lab, node: &NodeSpec, pod: &PodRef) -> Result<Added, PluginError> {
    add_with(lab, node, pod, None)
}

fn add_with(
    lab: &Lab,
    node: &NodeSpec,
    pod: &PodRef,
    ips: Option<&[String; 2]>,
) -> Result<Added, PluginError> {
    let loopback = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
    exec(lab, node, pod, "ADD", &loopback.to_string())?;
    let list = read_list(lab, node)?;
    let mut outputs = Vec::new();
    let mut prev: Option<String> = None;
    for plugin in plugins(&list) {
        let conf = plugin_conf(&list, plugin, prev.as_deref(), ips)?;
        let out = exec(lab, node, pod, "ADD", &conf)?;
        outputs.push((plugin_type(plugin), out.clone()));
        prev = Some(out);
    }
    if let Some(result) = &prev {
        let cache = node_dir(lab, node).join("results").join(&pod.container_id);
        let _ = fs::write(cache, result);
    }
    Ok(Added { outputs })
}

/// `DEL`: the list's plugins in reverse order, then the loopback network.
pub fn del(lab: &Lab, node: &NodeSpec, pod: &PodRef) -> Result<(), PluginError> {
    let list = read_list(lab, node)?;
    let prev = cached(lab, node, pod);
    for plugin in plugins(&list).iter().rev() {
        let conf = plugin_conf(&list, plugin, prev.as_deref(), None)?;
        exec(lab, node, pod, "DEL", &conf)?;
    }
    let loopback = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
    exec(lab, node, pod, "DEL", &loopback.to_string())?;
    let _ = fs::remove_file(node_dir(lab, node).join("results").join(&pod.container_id));
    Ok(())
}

/// `CHECK`: the list's plugins in order, with the kept result.
pub fn check(lab: &Lab, node: &NodeSpec, pod: &PodRef) -> Result<(), PluginError> {
    let list = read_list(lab, node)?;
    let prev = cached(lab, node, pod);
    for plugin in plugins(&list) {
        let conf = plugin_conf(&list, plugin, prev.as_deref(), None)?;
        exec(lab, node, pod, "CHECK", &conf)?;
    }
    Ok(())
}

/// Runs `plugin` of the node's list alone with `prev` as its previous
/// result: one link of the chain, as the runtime runs each.
pub fn run_plugin(
    lab: &Lab,
    node: &NodeSpec,
    pod: &PodRef,
    command: &str,
    plugin: &str,
    prev: Option<&str>,
) -> Result<String, PluginError> {
    let list = read_list(lab, node)?;
    let entry = plugins(&list)
        .into_iter()
        .find(|p| plugin_type(p) == plugin)
        .ok_or_else(|| PluginError {
            plugin: plugin.to_owned(),
            command: command.to_owned(),
            status: "not in the list".to_owned(),
            output: list.to_string(),
        })?;
    let conf = plugin_conf(&list, entry, prev, None)?;
    exec(lab, node, pod, command, &conf)
}

/// `VERSION` of one plugin of the search path.
pub fn version(lab: &Lab, node: &NodeSpec, plugin: &str) -> Result<String, PluginError> {
    let pod = PodRef {
        namespace: String::new(),
        name: String::new(),
        uid: String::new(),
        container_id: String::new(),
        netns: PathBuf::new(),
    };
    let conf = json!({"cniVersion": "1.0.0", "name": "version", "type": plugin}).to_string();
    exec(lab, node, &pod, "VERSION", &conf)
}

fn cached(lab: &Lab, node: &NodeSpec, pod: &PodRef) -> Option<String> {
    fs::read_to_string(node_dir(lab, node).join("results").join(&pod.container_id)).ok()
}

fn read_list(lab: &Lab, node: &NodeSpec) -> Result<Value, PluginError> {
    // The runtime reads the first file of the folder, as libcni does.
    let dir = conf_dir(lab, node);
    let failed = |output: String| PluginError {
        plugin: "(configuration)".to_owned(),
        command: "read".to_owned(),
        status: dir.display().to_string(),
        output,
    };
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|e| failed(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    let file = files
        .first()
        .ok_or_else(|| failed("no .conflist".to_owned()))?;
    let text = fs::read_to_string(file).map_err(|e| failed(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| failed(format!("{}: {e}", file.display())))
}

fn plugins(list: &Value) -> Vec<&Value> {
    list["plugins"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn plugin_type(plugin: &Value) -> String {
    plugin["type"].as_str().unwrap_or_default().to_owned()
}

/// One plugin's configuration: its own keys, the list's name and version,
/// `args.cni.ips` when addresses are asked for, and the previous result as
/// raw bytes.
fn plugin_conf(
    list: &Value,
    plugin: &Value,
    prev: Option<&str>,
    ips: Option<&[String; 2]>,
) -> Result<String, PluginError> {
    #[derive(Serialize)]
    struct Conf<'a> {
        #[serde(rename = "cniVersion")]
        cni_version: &'a Value,
        name: &'a Value,
        #[serde(flatten)]
        plugin: Map<String, Value>,
        #[serde(rename = "prevResult", skip_serializing_if = "Option::is_none")]
        prev_result: Option<&'a RawValue>,
    }
    let mut own = plugin.as_object().cloned().unwrap_or_default();
    if let Some(ips) = ips {
        own.insert("args".to_owned(), json!({"cni": {"ips": ips}}));
    }
    let raw = prev
        .map(serde_json::from_str::<&RawValue>)
        .transpose()
        .map_err(|e| PluginError {
            plugin: plugin_type(plugin),
            command: "prevResult".to_owned(),
            status: "not JSON".to_owned(),
            output: e.to_string(),
        })?;
    Ok(serde_json::to_string(&Conf {
        cni_version: &list["cniVersion"],
        name: &list["name"],
        plugin: own,
        prev_result: raw,
    })
    .expect("a configuration serializes"))
}

/// Runs one plugin as a runtime does; returns what it printed.
fn exec(
    lab: &Lab,
    node: &NodeSpec,
    pod: &PodRef,
    command: &str,
    conf: &str,
) -> Result<String, PluginError> {
    let conf_value: Value = serde_json::from_str(conf).unwrap_or_default();
    let plugin = plugin_type(&conf_value);
    let failed = |status: String, output: String| PluginError {
        plugin: plugin.clone(),
        command: command.to_owned(),
        status,
        output,
    };
    let search = [bin_dir(lab), PathBuf::from(REFERENCE_PLUGINS)];
    let binary = search
        .iter()
        .map(|d| d.join(&plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            failed(
                "not found".to_owned(),
                format!(
                    "no `{plugin}` in {} (run `cargo xtask setup`)",
                    search
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            )
        })?;
    let path = std::env::join_paths(&search).expect("no colon in lab paths");
    let mut cmd = Command::new(&binary);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", &pod.netns)
        .env("CNI_IFNAME", if plugin == "loopback" { "lo" } else { "eth0" })
        .env("CNI_PATH", path)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.container_id, pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = lab
        .spawn_on_node(node, cmd)
        .map_err(|e| failed("not started".to_owned(), e.to_string()))?;
    if let Some(mut stdin) = child.child_mut().stdin.take() {
        let _ = stdin.write_all(conf.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed("not finished".to_owned(), e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(failed(
            out.status.to_string(),
            format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        ))
    }
}
