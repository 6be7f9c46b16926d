//! Admission of connections on a daemon's listening sockets: what every
//! port a pod or a peer node can reach does before it spends more than a
//! descriptor on a connection.
//!
//! - Each source address may hold [`Limits::max_connections_per_source`]
//!   connections and have [`Limits::max_handshakes_per_source`] of them
//!   still unauthenticated; each listener carries at most
//!   [`Limits::max_handshakes`] handshakes at once. Past a cap a connection
//!   is reset at once and counted, so one hostile address cannot hold the
//!   slots that other nodes need.
//! - A handshake has [`Limits::handshake_timeout`] to finish.
//! - Accept errors never spin the loop: out of descriptors (EMFILE,
//!   ENFILE), the daemon frees a descriptor it keeps in reserve, accepts the
//!   waiting connection and resets it (a clear refusal instead of a client
//!   left hanging), logs once per episode and counts; other errors back off.

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::{TcpListener, TcpStream};

/// How much one listener lets its peers hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a peer has to finish its TLS handshake (on a plain HTTP
    /// port: to send a request's head).
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once on one listener.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one source address.
    pub max_handshakes_per_source: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
    /// How long a connection may carry no request before it is closed.
    pub idle_timeout: Duration,
    /// The largest request head (HTTP/1) or header list (HTTP/2).
    pub max_header_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 1024,
            max_handshakes_per_source: 64,
            max_connections_per_source: 1024,
            idle_timeout: Duration::from_secs(300),
            max_header_bytes: 16 << 10,
        }
    }
}

impl Limits {
    /// For listeners whose only peers are the processes of one pod (the
    /// in-pod capture ports): the pod's own connections are its business,
    /// so no cap per source; the file limit still holds.
    pub fn per_pod(&self) -> Self {
        Self {
            max_connections_per_source: usize::MAX,
            max_handshakes_per_source: usize::MAX,
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    listener: &'static str,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    listener: &'static str,
    error: String,
}

/// The admission metrics of a daemon's listeners, one series per listener.
#[derive(Clone, Debug, Default)]
pub struct AdmissionMetrics {
    connections: Family<ListenerLabels, Gauge>,
    handshakes: Family<ListenerLabels, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    accept_errors: Family<ErrorLabels, Counter>,
    file_limit: Gauge,
}

impl AdmissionMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "lacewing_listener_connections",
            "Connections open on a listener",
            m.connections.clone(),
        );
        registry.register(
            "lacewing_listener_handshakes",
            "Connections on a listener still in their TLS handshake (or, on plain HTTP, before their first request)",
            m.handshakes.clone(),
        );
        registry.register(
            "lacewing_listener_refused",
            "Connections a listener reset at once, by reason: per_source (connections from one address), per_source_handshakes, handshakes (the listener's cap), file_limit (out of descriptors)",
            m.refused.clone(),
        );
        registry.register(
            "lacewing_listener_timeouts",
            "Connections a listener closed for a timeout, by phase: handshake, header (no request after the handshake), idle",
            m.timeouts.clone(),
        );
        registry.register(
            "lacewing_listener_accept_errors",
            "Errors accepting a connection, by error",
            m.accept_errors.clone(),
        );
        registry.register(
            "lacewing_process_file_limit",
            "The open-file limit the daemon runs with (raised to the hard limit at start)",
            m.file_limit.clone(),
        );
        m
    }

    /// Records the file limit the daemon runs with.
    pub fn set_file_limit(&self, limit: u64) {
        self.file_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
}

/// Open connections and handshakes of one source address.
#[derive(Default)]
struct Held {
    connections: usize,
    handshakes: usize,
}

struct Shared {
    listener: &'static str,
    limits: Limits,
    metrics: AdmissionMetrics,
    by_source: Mutex<HashMap<IpAddr, Held>>,
    handshakes: Mutex<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn labels(&self) -> ListenerLabels {
        ListenerLabels {
            listener: self.listener,
        }
    }

    /// Gives back what `give` takes from `source`'s count; a source that
    /// holds nothing more is forgotten.
    fn release(&self, source: IpAddr, give: impl FnOnce(&mut Held)) {
        let mut by_source = lock(&self.by_source);
        if let Some(held) = by_source.get_mut(&source) {
            give(held);
            if held.connections == 0 && held.handshakes == 0 {
                by_source.remove(&source);
            }
        }
    }

    fn refuse(&self, reason: &'static str) {
        self.metrics
            .refused
            .get_or_create(&RefusedLabels {
                listener: self.listener,
                reason,
            })
            .inc();
    }
}

/// The admission of one listener (`listener` names it in metrics and logs:
/// `tunnel`, `controller`, `metrics`, `admin`, `pod_outbound`...).
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

/// A connection that was let in. It counts against its source until it is
/// dropped; while its [`Handshake`] lives it also counts as a handshake.
pub struct Admitted {
    pub stream: TcpStream,
    pub from: SocketAddr,
    pub slot: Slot,
    pub handshake: Handshake,
}

/// A connection's place in its source's count; given back on drop.
pub struct Slot {
    shared: Arc<Shared>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.release(self.source, |held| {
            held.connections = held.connections.saturating_sub(1);
        });
        self.shared
            .metrics
            .connections
            .get_or_create(&self.shared.labels())
            .dec();
    }
}

/// A handshake in progress; drop it when the peer has proven itself (or
/// sent its first request).
pub struct Handshake {
    shared: Arc<Shared>,
    source: IpAddr,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        *lock(&self.shared.handshakes) -= 1;
        self.shared.release(self.source, |held| {
            held.handshakes = held.handshakes.saturating_sub(1);
        });
        self.shared
            .metrics
            .handshakes
            .get_or_create(&self.shared.labels())
            .dec();
    }
}

/// A handshake that did not finish in time.
#[derive(Debug, thiserror::Error)]
#[error("the peer did not finish its handshake within {0:?}")]
pub struct HandshakeTimeout(pub Duration);

/// Why [`Admission::admit`] turned a connection away: a metric label.
fn over_limit(shared: &Shared, held: &Held, handshakes: usize) -> Option<&'static str> {
    let l = &shared.limits;
    if held.connections >= l.max_connections_per_source {
        Some("per_source")
    } else if held.handshakes >= l.max_handshakes_per_source {
        Some("per_source_handshakes")
    } else if handshakes >= l.max_handshakes {
        Some("handshakes")
    } else {
        None
    }
}

/// What the accept loop does after an error.
#[derive(Debug, PartialEq, Eq)]
enum AfterError {
    /// The connection was aborted before we took it: go on at once.
    Continue,
    /// Out of descriptors: refuse the waiting connection with the reserve.
    OutOfFiles,
    /// Anything else: wait a little.
    BackOff,
}

fn after_error(err: &std::io::Error) -> AfterError {
    match err.raw_os_error() {
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM) => AfterError::Continue,
        Some(libc::EMFILE | libc::ENFILE) => AfterError::OutOfFiles,
        _ => AfterError::BackOff,
    }
}

/// One descriptor held back for refusing connections when the process is
/// out of them (the technique nginx and libev use).
static RESERVE: Mutex<Option<File>> = Mutex::new(None);

fn open_reserve() {
    let mut reserve = lock(&RESERVE);
    if reserve.is_none() {
        *reserve = File::open("/dev/null").ok();
    }
}

impl Admission {
    pub fn new(listener: &'static str, limits: Limits, metrics: AdmissionMetrics) -> Self {
        open_reserve();
        Self {
            shared: Arc::new(Shared {
                listener,
                limits,
                metrics,
                by_source: Mutex::default(),
                handshakes: Mutex::new(0),
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// The next connection on `listener` that is within the limits. Those
    /// over a limit are reset and counted; accept errors are handled here
    /// and never returned.
    pub async fn accept(&self, listener: &TcpListener) -> Admitted {
        let mut out_of_files = false;
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    if out_of_files {
                        tracing::info!(
                            listener = self.shared.listener,
                            "descriptors available again: accepting"
                        );
                        out_of_files = false;
                    }
                    if let Some(admitted) = self.admit(stream, from) {
                        return admitted;
                    }
                }
                Err(err) => {
                    self.shared
                        .metrics
                        .accept_errors
                        .get_or_create(&ErrorLabels {
                            listener: self.shared.listener,
                            error: err.kind().to_string().replace(' ', "_"),
                        })
                        .inc();
                    match after_error(&err) {
                        AfterError::Continue => {}
                        AfterError::OutOfFiles => {
                            if !out_of_files {
                                tracing::warn!(
                                    listener = self.shared.listener,
                                    %err,
                                    "out of descriptors: refusing new connections until some close"
                                );
                                out_of_files = true;
                            }
                            self.refuse_with_reserve(listener).await;
                        }
                        AfterError::BackOff => {
                            tracing::warn!(listener = self.shared.listener, %err, "accepting a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
    }

    /// Out of descriptors: give up the reserve, reset the waiting
    /// connection, take the reserve back. Without a reserve (another
    /// listener holds it, or it could not be reopened) wait instead, so the
    /// loop never spins.
    async fn refuse_with_reserve(&self, listener: &TcpListener) {
        let reserve = lock(&RESERVE).take();
        let refused = reserve.is_some() && {
            drop(reserve);
            crate::os::accept_and_reset(listener.as_fd())
        };
        open_reserve();
        if refused {
            self.shared.refuse("file_limit");
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Counts `stream` in, or resets it when its source or the listener is
    /// over a limit.
    fn admit(&self, stream: TcpStream, from: SocketAddr) -> Option<Admitted> {
        let shared = &self.shared;
        let source = from.ip().to_canonical();
        {
            let mut by_source = lock(&shared.by_source);
            let mut handshakes = lock(&shared.handshakes);
            let held = by_source.entry(source).or_default();
            if let Some(reason) = over_limit(shared, held, *handshakes) {
                if held.connections == 0 && held.handshakes == 0 {
                    by_source.remove(&source);
                }
                drop((handshakes, by_source));
                tracing::debug!(listener = shared.listener, %from, reason, "connection refused");
                shared.refuse(reason);
                let _ = stream.set_zero_linger();
                return None;
            }
            held.connections += 1;
            held.handshakes += 1;
            *handshakes += 1;
        }
        let labels = shared.labels();
        shared.metrics.connections.get_or_create(&labels).inc();
        shared.metrics.handshakes.get_or_create(&labels).inc();
        Some(Admitted {
            stream,
            from,
            slot: Slot {
                shared: Arc::clone(shared),
                source,
            },
            handshake: Handshake {
                shared: Arc::clone(shared),
                source,
            },
        })
    }

    /// Runs a handshake with the listener's timeout; a timeout is counted.
    pub async fn handshake<T>(
        &self,
        handshake: impl Future<Output = T>,
    ) -> Result<T, HandshakeTimeout> {
        let limit = self.shared.limits.handshake_timeout;
        tokio::time::timeout(limit, handshake).await.map_err(|_| {
            self.timed_out("handshake");
            HandshakeTimeout(limit)
        })
    }

    /// Counts a connection closed for a timeout in `phase` (`handshake`,
    /// `header`, `idle`).
    pub fn timed_out(&self, phase: &'static str) {
        self.shared
            .metrics
            .timeouts
            .get_or_create(&TimeoutLabels {
                listener: self.shared.listener,
                phase,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests;
