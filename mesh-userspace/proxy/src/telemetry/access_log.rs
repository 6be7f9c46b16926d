//! Access logs: one JSON line per connection (L4) and per request (L7),
//! written by a thread of their own to stdout or a file.
//!
//! Off unless the node's `--access-log` logs everything it carries, or the
//! MeshConfig switches it on for a namespace (then the workloads of that
//! namespace carry `access_log`). A line is about the workload on this node
//! (the client on the outbound side, the pod on the inbound side), so a
//! namespace's switch logs what its own pods send and receive.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use lacewing_core::model::workloads::Workload;
use serde::Serialize;

use super::{OutcomeFamily, Queue};

/// Lines wait at most this long to be written: the writer wakes at most
/// this often however many lines come (a flood costs no extra wake-ups).
const BATCH_INTERVAL: Duration = Duration::from_millis(20);
/// The longest path a line carries.
pub const MAX_PATH: usize = 256;

/// Where lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl std::str::FromStr for Sink {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "" | "-" | "stdout" => Self::Stdout,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// The node's access log.
pub struct AccessLog {
    queue: Queue<String>,
    /// Every connection and request this node carries, whatever the
    /// namespace says.
    all: bool,
}

impl AccessLog {
    /// Opens `sink` and starts the writer; `capacity` lines wait at most
    /// (more are dropped and counted in `outcomes`).
    pub fn start(
        sink: &Sink,
        capacity: usize,
        all: bool,
        outcomes: OutcomeFamily,
    ) -> std::io::Result<Arc<Self>> {
        let out: Box<dyn std::io::Write + Send> = match sink {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (queue, mut rx) = Queue::new(capacity, outcomes.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
                while let Some(first) = rx.blocking_recv() {
                    let mut n = 0;
                    let mut line = Some(first);
                    while let Some(l) = line {
                        // A write error (disk full) loses lines, counted;
                        // never the daemon.
                        if writeln!(out, "{l}").is_ok() {
                            n += 1;
                        }
                        line = rx.try_recv().ok();
                    }
                    let _ = out.flush();
                    super::count(&outcomes, "written", n);
                    std::thread::sleep(BATCH_INTERVAL);
                }
            })?;
        Ok(Arc::new(Self { queue, all }))
    }

    /// Whether lines about `workload` (the one on this node) are written.
    pub fn wants(&self, workload: Option<&Workload>) -> bool {
        self.all || workload.is_some_and(|w| w.access_log)
    }

    pub fn write(&self, entry: &Entry) {
        match serde_json::to_string(entry) {
            Ok(line) => self.queue.push(line),
            Err(err) => tracing::debug!(%err, "an access log line did not encode"),
        }
    }
}

/// One line. What a side cannot know is left out.
#[derive(Debug, Default, Serialize)]
pub struct Entry {
    pub time: String,
    /// `connection` or `request`.
    pub kind: &'static str,
    /// `outbound` (this node's client) or `inbound` (this node's pod).
    pub direction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    /// `namespace/name` of the Service dialled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    /// The address dialled (a ClusterIP:port or a pod's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_address: Option<String>,
    /// The HTTPRoute (`namespace/name`) that chose the backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The endpoint that answered (the last tried).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `tcp`, `http/1.1`, `http/2`, `grpc`.
    pub protocol: &'static str,
    /// How it went: `tunnel`, `same_node`, `passthrough` (connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_taken: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// From the client, and from the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Why the mesh refused or failed it (`policy_denied`, `no_backend`,
    /// `timeout`, `circuit_open`, `rate_limited`, `ejected`,
    /// `handshake_failed`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy that decided a refusal (`namespace/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Entry {
    /// A line started at `started`, taking until now.
    pub fn new(kind: &'static str, direction: &'static str, started: SystemTime) -> Self {
        Self {
            time: super::rfc3339(started),
            kind,
            direction,
            duration_ms: started
                .elapsed()
                .map_or(0.0, |d| (d.as_secs_f64() * 1e6).round() / 1e3),
            protocol: "tcp",
            ..Self::default()
        }
    }

    /// The source fields of `workload`.
    pub fn from_workload(mut self, workload: &Workload, trust_domain: &str) -> Self {
        self.source_workload = Some(workload.name.clone());
        self.source_namespace = Some(workload.namespace.clone());
        self.source_identity = Some(workload.identity(trust_domain));
        self
    }

    /// The destination fields of `workload`.
    pub fn to_workload(mut self, workload: &Workload, trust_domain: &str) -> Self {
        self.destination_workload = Some(workload.name.clone());
        self.destination_namespace = Some(workload.namespace.clone());
        self.destination_identity = Some(workload.identity(trust_domain));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_leaves_out_what_its_side_does_not_know() {
        let mut e = Entry::new("request", "outbound", SystemTime::UNIX_EPOCH);
        e.time = "t".into();
        e.duration_ms = 1.5;
        e.status = Some(200);
        e.method = Some("GET".into());
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"time":"t","kind":"request","direction":"outbound","protocol":"tcp","method":"GET","status":200,"duration_ms":1.5}"#
        );
    }

    #[test]
    fn lines_reach_the_file_in_order_and_are_counted() {
        let dir = std::env::temp_dir().join(format!("lw-access-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let outcomes = OutcomeFamily::default();
        let log = AccessLog::start(&Sink::File(dir.clone()), 100, true, outcomes.clone()).unwrap();
        for i in 0..10 {
            let mut e = Entry::new("request", "outbound", SystemTime::now());
            e.status = Some(200 + i);
            log.write(&e);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let lines = loop {
            let text = std::fs::read_to_string(&dir).unwrap_or_default();
            if text.lines().count() == 10 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::yield_now();
        };
        let statuses: Vec<u64> = lines
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(statuses, (200..210).collect::<Vec<_>>());
        let _ = std::fs::remove_file(&dir);
    }
}
