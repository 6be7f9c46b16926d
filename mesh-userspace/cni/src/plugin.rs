//! The CNI side of `lacewing-cni`: what the container runtime hands a
//! chained plugin (the `CNI_*` environment and the network configuration
//! on stdin), and what it answers after asking the node daemon.
//!
//! Spec: CNI 1.0.0 (results of 0.3.1 and 0.4.0 are passed through as
//! they come). `prevResult` is never parsed into types: its bytes go back
//! out as they came in, so what the pod gets is exactly what the primary
//! plugin gave.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::handover::{self, Answer, HandoverError, Pod, Request};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The versions whose results this plugin passes on.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The runtime's call, from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub args: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The network configuration on stdin: the keys we read; the rest is the
/// primary's.
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Box<RawValue>>,
    /// The daemon's socket (default [`DEFAULT_SOCKET`]).
    pub socket: Option<String>,
    /// How long an `ADD` waits for the daemon's answer (default 30).
    #[serde(rename = "timeoutSeconds")]
    pub timeout_seconds: Option<u64>,
    /// Where this plugin logs (default [`DEFAULT_LOG`]).
    #[serde(rename = "logFile")]
    pub log_file: Option<String>,
}

pub const DEFAULT_SOCKET: &str = "/run/lacewing/cni.sock";
pub const DEFAULT_LOG: &str = "/var/log/lacewing-cni.log";

/// The file beside the daemon's socket that names the namespaces it knows
/// to be meshed, one per line: what the plugin goes by when the daemon
/// does not answer.
pub fn meshed_namespaces_file(socket: &Path) -> PathBuf {
    socket.with_file_name("cni-meshed-namespaces")
}

/// A CNI error (spec section "Error"): codes 1-99 are the spec's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// Spec error codes used here.
pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const BAD_ENV: u32 = 4;
pub const BAD_CONFIG: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
/// Ours (100 and up are the plugin's): a meshed pod whose capture is not
/// what it should be (`CHECK`).
pub const NOT_CAPTURED: u32 = 100;

impl Call {
    /// Reads the call from `env` (a name to value lookup).
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, (u32, String)> {
        let command = match env("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            other => {
                return Err((
                    BAD_ENV,
                    format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"),
                ));
            }
        };
        let args = env("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let container_id = env("CNI_CONTAINERID").unwrap_or_default();
        if command != Command::Version && container_id.is_empty() {
            return Err((BAD_ENV, "CNI_CONTAINERID is not set".to_owned()));
        }
        Ok(Self {
            command,
            container_id,
            netns: env("CNI_NETNS").unwrap_or_default(),
            args,
        })
    }
}

/// The VERSION answer.
pub fn version_answer() -> String {
    serde_json::json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string()
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Printed on stdout: a result, a CNI error, or nothing.
    pub stdout: String,
    pub success: bool,
    /// One line for the log file.
    pub log: String,
}

impl Outcome {
    fn ok(stdout: impl Into<String>, log: String) -> Self {
        Self {
            stdout: stdout.into(),
            success: true,
            log,
        }
    }

    fn error(version: &str, code: u32, msg: &str, details: String) -> Self {
        let err = CniError {
            cni_version: version.to_owned(),
            code,
            msg: msg.to_owned(),
            details,
        };
        Self {
            stdout: serde_json::to_string(&err).expect("an error serializes"),
            success: false,
            log: format!("error {code}: {msg}: {}", err.details),
        }
    }
}

/// Runs one call: `stdin` is the network configuration the runtime sent.
pub fn run(call: &Call, stdin: &[u8]) -> Outcome {
    if call.command == Command::Version {
        return Outcome::ok(version_answer(), "version".to_owned());
    }
    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(conf) => conf,
        Err(err) => {
            return Outcome::error(
                "1.0.0",
                BAD_CONFIG,
                "the network configuration on stdin is not valid JSON",
                err.to_string(),
            );
        }
    };
    let version = conf.cni_version.as_str();
    if !SUPPORTED.contains(&version) {
        return Outcome::error(
            version,
            INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!("lacewing-cni supports {}", SUPPORTED.join(", ")),
        );
    }
    let socket = PathBuf::from(conf.socket.as_deref().unwrap_or(DEFAULT_SOCKET));
    let timeout = Duration::from_secs(conf.timeout_seconds.unwrap_or(30));
    // A pod the runtime does not name (not Kubernetes) is none of ours.
    let Some(mut pod) = pod_of(call) else {
        return pass(
            call,
            &conf,
            "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME)",
        );
    };
    match call.command {
        Command::Version => unreachable!("answered above"),
        Command::Del => {
            let answer = handover::ask(&socket, &Request::Del(pod.clone()), timeout);
            // DEL succeeds whatever is left: a daemon that is down has
            // nothing of the pod's to release (it finds pods again at start).
            Outcome::ok("", format!("DEL {}: {}", pod.key(), said(&answer)))
        }
        Command::Add | Command::Check => {
            let Some(prev) = conf.prev_result.as_deref() else {
                return Outcome::error(
                    version,
                    INVALID_CONFIG,
                    "lacewing-cni is a chained plugin: it needs the primary plugin's prevResult",
                    "put it after the primary plugin in the same conflist".to_owned(),
                );
            };
            pod.ips = match ips_of(prev) {
                Ok(ips) => ips,
                Err(details) => {
                    return Outcome::error(
                        version,
                        BAD_CONFIG,
                        "prevResult has no readable `ips`",
                        details,
                    );
                }
            };
            let request = if call.command == Command::Add {
                Request::Add(pod.clone())
            } else {
                Request::Check(pod.clone())
            };
            let answer = handover::ask(&socket, &request, timeout);
            let what = if call.command == Command::Add {
                "ADD"
            } else {
                "CHECK"
            };
            let out = |log: String| {
                if call.command == Command::Add {
                    // The primary's result, byte for byte.
                    Outcome::ok(prev.get(), log)
                } else {
                    Outcome::ok("", log)
                }
            };
            match answer {
                Ok(Answer::Captured | Answer::NotMeshed | Answer::Released) => {
                    out(format!("{what} {}: {}", pod.key(), said(&answer)))
                }
                Ok(Answer::Error { message }) => Outcome::error(
                    version,
                    if call.command == Command::Add {
                        TRY_AGAIN_LATER
                    } else {
                        NOT_CAPTURED
                    },
                    "the Lacewing node daemon cannot capture this meshed pod",
                    message,
                ),
                Err(err) => {
                    // No answer: a pod in a namespace the daemon last knew
                    // as meshed must not start uncaptured; any other pod
                    // never waits on the daemon.
                    if namespace_meshed(&meshed_namespaces_file(&socket), &pod.namespace) {
                        Outcome::error(
                            version,
                            TRY_AGAIN_LATER,
                            "the Lacewing node daemon is not answering and this pod's namespace is meshed",
                            format!(
                                "{err}; the pod starts once the daemon runs (kubectl -n lacewing-system get pods -l app.kubernetes.io/name=lacewing-node)"
                            ),
                        )
                    } else {
                        out(format!("{what} {}: passed through, {err}", pod.key()))
                    }
                }
            }
        }
    }
}

/// A pass-through answer: `ADD` returns the previous result unchanged.
fn pass(call: &Call, conf: &NetConf, why: &str) -> Outcome {
    let out = match (call.command, conf.prev_result.as_deref()) {
        (Command::Add, Some(prev)) => prev.get().to_owned(),
        _ => String::new(),
    };
    Outcome::ok(
        out,
        format!("{:?} {}: {why}", call.command, call.container_id),
    )
}

fn said(answer: &Result<Answer, HandoverError>) -> String {
    match answer {
        Ok(a) => serde_json::to_string(a).expect("an answer serializes"),
        Err(err) => err.to_string(),
    }
}

/// The pod named in `CNI_ARGS`, as the kubelet passes it.
fn pod_of(call: &Call) -> Option<Pod> {
    Some(Pod {
        namespace: call.args.get("K8S_POD_NAMESPACE")?.clone(),
        name: call.args.get("K8S_POD_NAME")?.clone(),
        uid: call.args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        container_id: call.container_id.clone(),
        netns: call.netns.clone(),
        ips: Vec::new(),
    })
}

/// The addresses in a result (CNI 0.3.0 to 1.0.0: `ips[].address`, a CIDR).
fn ips_of(result: &RawValue) -> Result<Vec<IpAddr>, String> {
    #[derive(Deserialize)]
    struct Result_ {
        #[serde(default)]
        ips: Vec<Ip>,
    }
    #[derive(Deserialize)]
    struct Ip {
        address: String,
    }
    let parsed: Result_ = serde_json::from_str(result.get()).map_err(|e| e.to_string())?;
    parsed
        .ips
        .iter()
        .map(|ip| {
            let addr = ip.address.split('/').next().unwrap_or_default();
            addr.parse()
                .map_err(|_| format!("`{}` is not an address in CIDR form", ip.address))
        })
        .collect()
}

/// Whether `namespace` is a line of the daemon's meshed-namespaces file.
fn namespace_meshed(file: &Path, namespace: &str) -> bool {
    std::fs::read_to_string(file).is_ok_and(|text| text.lines().any(|l| l.trim() == namespace))
}

/// Appends `line` to the log file named in the configuration. A log that
/// cannot be written never fails the pod.
pub fn log(stdin: &[u8], line: &str) {
    let file = serde_json::from_slice::<NetConf>(stdin)
        .ok()
        .and_then(|c| c.log_file)
        .unwrap_or_else(|| DEFAULT_LOG.to_owned());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = writeln!(f, "{now} {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn a_kubelet_add_names_the_pod_and_its_namespace() {
        let call = Call::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1b4e",
            ),
        ]))
        .unwrap();
        assert_eq!(call.command, Command::Add);
        assert_eq!(call.netns, "/var/run/netns/cni-1234");
        assert_eq!(pod_of(&call).unwrap().key(), "shop/web-0");
        assert_eq!(call.args["K8S_POD_UID"], "1b4e");
    }

    #[test]
    fn version_needs_nothing_else_and_a_bad_command_is_a_spec_error() {
        let call = Call::from_env(env(&[("CNI_COMMAND", "VERSION")])).unwrap();
        assert_eq!(call.command, Command::Version);
        let answer: serde_json::Value = serde_json::from_str(&version_answer()).unwrap();
        assert_eq!(answer["supportedVersions"][3], "1.0.0");
        let (code, msg) = Call::from_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert_eq!(code, BAD_ENV);
        assert!(msg.contains("FROB"), "{msg}");
        let (code, _) = Call::from_env(env(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(code, BAD_ENV, "ADD without a container id");
    }

    #[test]
    fn the_previous_result_keeps_its_bytes() {
        let conf: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"k8s","type":"lacewing-cni","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.0.7/24","gateway":"10.244.0.1","interface":0}]}}"#,
        )
        .unwrap();
        assert_eq!(
            conf.prev_result.unwrap().get(),
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.0.7/24","gateway":"10.244.0.1","interface":0}]}"#
        );
    }

    /// A call for pod `ns/web-0` with a daemon that is not running at
    /// `dir/cni.sock`.
    fn call(command: Command, ns: &str) -> Call {
        Call {
            command,
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/cni-1".into(),
            args: BTreeMap::from([
                ("K8S_POD_NAMESPACE".to_owned(), ns.to_owned()),
                ("K8S_POD_NAME".to_owned(), "web-0".to_owned()),
            ]),
        }
    }

    #[test]
    fn with_no_daemon_a_meshed_namespace_waits_and_any_other_passes_through_in_every_version() {
        let dir = std::env::temp_dir().join(format!("lacewing-cni-plugin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("cni.sock");
        std::fs::write(meshed_namespaces_file(&socket), "shop\npayments\n").unwrap();
        for version in ["0.3.1", "0.4.0", "1.0.0"] {
            let prev = format!(
                r#"{{"cniVersion":"{version}","interfaces":[{{"name":"eth0","sandbox":"/var/run/netns/cni-1"}}],"ips":[{{"version":"4","address":"10.244.0.7/24","gateway":"10.244.0.1","interface":0}}]}}"#
            );
            let conf = format!(
                r#"{{"cniVersion":"{version}","name":"k8s","type":"lacewing-cni","socket":"{}","prevResult":{prev}}}"#,
                socket.display()
            );
            let passed = run(&call(Command::Add, "default"), conf.as_bytes());
            assert!(passed.success, "{passed:?}");
            assert_eq!(passed.stdout, prev, "the result, byte for byte ({version})");
            let waits = run(&call(Command::Add, "shop"), conf.as_bytes());
            assert!(!waits.success);
            let err: serde_json::Value = serde_json::from_str(&waits.stdout).unwrap();
            assert_eq!(err["code"], TRY_AGAIN_LATER);
            assert_eq!(err["cniVersion"], version);
            // DEL never fails: a daemon that is down holds nothing to release.
            let del = run(&call(Command::Del, "shop"), conf.as_bytes());
            assert!(del.success && del.stdout.is_empty(), "{del:?}");
        }
        let old = r#"{"cniVersion":"0.2.0","name":"k8s","type":"lacewing-cni"}"#;
        let refused = run(&call(Command::Add, "default"), old.as_bytes());
        let err: serde_json::Value = serde_json::from_str(&refused.stdout).unwrap();
        assert_eq!(err["code"], INCOMPATIBLE_VERSION);
        let alone = r#"{"cniVersion":"1.0.0","name":"k8s","type":"lacewing-cni"}"#;
        let refused = run(&call(Command::Add, "default"), alone.as_bytes());
        assert!(refused.stdout.contains("chained plugin"), "{refused:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
