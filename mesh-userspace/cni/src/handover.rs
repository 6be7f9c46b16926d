//! The hand-over between the plugin and the node daemon: one connection per
//! call on the daemon's root-only Unix socket, one JSON line each way.
//!
//! ```text
//! plugin -> daemon  {"op":"add","namespace":"shop","name":"web-0","uid":"…","container_id":"…","netns":"/var/run/netns/cni-…","ips":["10.244.0.7"]}
//! daemon -> plugin  {"answer":"captured"} | {"answer":"not-meshed"} | {"answer":"released"} | {"answer":"error","message":"…"}
//! ```
//!
//! `add` is answered once the pod's listeners are open (so its first
//! connection is captured) or once the daemon knows the pod is not meshed;
//! `del` once its capture is stopped; `check` with what the daemon does for
//! the pod now.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The longest request or answer line either side reads.
pub const MAX_LINE: u64 = 64 * 1024;

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Add(Pod),
    Del(Pod),
    Check(Pod),
}

impl Request {
    pub fn pod(&self) -> &Pod {
        match self {
            Self::Add(p) | Self::Del(p) | Self::Check(p) => p,
        }
    }
}

/// A pod as the runtime describes it to its CNI plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime sends it (recent kubelets do).
    #[serde(default)]
    pub uid: String,
    pub container_id: String,
    /// `CNI_NETNS`: a path to the pod's network namespace (empty on a `DEL`
    /// after the namespace is gone).
    #[serde(default)]
    pub netns: String,
    /// The pod's addresses, from the primary plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl Pod {
    /// `namespace/name`, the key the control plane sends workloads by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
pub enum Answer {
    /// The pod is meshed and its listeners are open.
    Captured,
    /// The pod is not meshed (or not known to the control plane yet): its
    /// traffic is left alone.
    NotMeshed,
    /// The pod's capture is stopped (or it had none).
    Released,
    /// The daemon could not do what was asked; the message says why.
    Error { message: String },
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Nothing listens on the socket: the daemon is not running.
    #[error("cannot reach the node daemon at {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    #[error("the node daemon at {path} did not answer: {source}")]
    NoAnswer {
        path: String,
        source: std::io::Error,
    },
    #[error("the node daemon at {path} answered what this plugin cannot read: {source}")]
    BadAnswer {
        path: String,
        source: serde_json::Error,
    },
}

/// Sends `request` to the daemon at `socket` and waits up to `timeout` for
/// its answer.
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Answer, HandoverError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|source| HandoverError::Unreachable {
        path: path.clone(),
        source,
    })?;
    let no_answer = |source| HandoverError::NoAnswer {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(no_answer)?;
    stream.set_write_timeout(Some(timeout)).map_err(no_answer)?;
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(no_answer)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&stream, MAX_LINE))
        .read_line(&mut answer)
        .map_err(no_answer)?;
    serde_json::from_str(&answer).map_err(|source| HandoverError::BadAnswer { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_read_as_documented() {
        let add: Request = serde_json::from_str(
            r#"{"op":"add","namespace":"shop","name":"web-0","uid":"u1","container_id":"c1","netns":"/run/netns/x","ips":["10.244.0.7","fd00:244::7"]}"#,
        )
        .unwrap();
        assert_eq!(add.pod().key(), "shop/web-0");
        assert_eq!(add.pod().ips.len(), 2);
        let del: Request = serde_json::from_str(
            r#"{"op":"del","namespace":"shop","name":"web-0","container_id":"c1"}"#,
        )
        .unwrap();
        assert!(matches!(del, Request::Del(ref p) if p.netns.is_empty() && p.ips.is_empty()));
        assert_eq!(
            serde_json::to_string(&Answer::NotMeshed).unwrap(),
            r#"{"answer":"not-meshed"}"#
        );
        assert_eq!(
            serde_json::from_str::<Answer>(r#"{"answer":"error","message":"no netns"}"#).unwrap(),
            Answer::Error {
                message: "no netns".into()
            }
        );
    }

    #[test]
    fn a_missing_daemon_is_unreachable_not_an_answer() {
        let socket =
            std::env::temp_dir().join(format!("lacewing-cni-none-{}.sock", std::process::id()));
        let request = Request::Check(Pod {
            namespace: "a".into(),
            name: "b".into(),
            uid: String::new(),
            container_id: "c".into(),
            netns: String::new(),
            ips: vec![],
        });
        let err = ask(&socket, &request, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, HandoverError::Unreachable { .. }), "{err}");
    }
}
