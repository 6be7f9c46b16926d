//! What the proxy tells operators about each connection and request
//! besides metrics: access logs ([`access_log`]) and trace spans exported
//! over OTLP ([`trace`]). Both leave the data path through a bounded queue
//! it never waits on ([`Queue`]): a line or span that does not fit is
//! dropped and counted, the request goes on.

pub mod access_log;
pub mod trace;

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::mpsc;

/// The node's access log and tracer, either of which may be off.
#[derive(Clone, Default)]
pub struct Telemetry {
    pub access_log: Option<Arc<access_log::AccessLog>>,
    pub tracer: Option<Arc<trace::Tracer>>,
}

impl Telemetry {
    /// The access log, if it wants lines about `workload` (the one on this
    /// node).
    pub fn log_for(
        &self,
        workload: Option<&lacewing_core::model::workloads::Workload>,
    ) -> Option<&Arc<access_log::AccessLog>> {
        self.access_log.as_ref().filter(|l| l.wants(workload))
    }
}

/// What a request's access log line and span carry, taken on its arrival
/// (the request itself goes on).
pub struct Seen {
    pub started: std::time::SystemTime,
    pub method: String,
    /// Bounded to [`access_log::MAX_PATH`].
    pub path: String,
    pub protocol: &'static str,
    /// The request body's length, when known.
    pub request_bytes: Option<u64>,
    pub log: Option<Arc<access_log::AccessLog>>,
    pub span: Option<trace::ActiveSpan>,
}

impl Seen {
    /// `req` as the access log (`log`, when it wants the request) and the
    /// tracer (`span`, when the request is traced) see it; `None` when
    /// neither does. A traced request is sent on with `span` as its parent.
    pub fn of<B: hyper::body::Body>(
        req: &mut http::Request<B>,
        log: Option<Arc<access_log::AccessLog>>,
        span: Option<trace::ActiveSpan>,
    ) -> Option<Self> {
        if log.is_none() && span.is_none() {
            return None;
        }
        if let Some(span) = &span {
            span.propagate(req.headers_mut());
        }
        let grpc = crate::answer::is_grpc(req.headers());
        Some(Self {
            started: std::time::SystemTime::now(),
            method: req.method().to_string(),
            path: bounded(req.uri().path(), access_log::MAX_PATH),
            protocol: protocol_of(req, grpc),
            request_bytes: req.body().size_hint().exact(),
            log,
            span,
        })
    }
}

/// The protocol of a request, as logs name it.
pub fn protocol_of<B>(req: &http::Request<B>, grpc: bool) -> &'static str {
    match (grpc, req.version()) {
        (true, _) => "grpc",
        (false, http::Version::HTTP_2) => "http/2",
        (false, http::Version::HTTP_10) => "http/1.0",
        _ => "http/1.1",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `written`/`exported`, or `dropped`.
    pub outcome: &'static str,
}

/// The sending end of a bounded queue: [`Queue::push`] never waits; what
/// does not fit is counted as dropped.
pub struct Queue<T> {
    tx: mpsc::Sender<T>,
    outcomes: OutcomeFamily,
}

impl<T> Queue<T> {
    /// A queue of `capacity` items, counting in `outcomes`.
    pub fn new(capacity: usize, outcomes: OutcomeFamily) -> (Self, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, outcomes }, rx)
    }

    /// Queues `item`, or drops and counts it when the queue is full (or its
    /// reader is gone).
    pub fn push(&self, item: T) {
        if self.tx.try_send(item).is_err() {
            count(&self.outcomes, "dropped", 1);
        }
    }
}

/// Items by outcome, as a queue and its reader count them.
pub type OutcomeFamily = Family<OutcomeLabels, Counter>;

/// Counts `n` items of `outcome` in `family` (the reader counts what it
/// wrote or exported, the queue what it dropped).
pub fn count(family: &OutcomeFamily, outcome: &'static str, n: u64) {
    family.get_or_create(&OutcomeLabels { outcome }).inc_by(n);
}

/// RFC 3339 UTC time with milliseconds, as access logs and most log
/// shippers expect.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// `text` cut to at most `max` bytes on a character boundary (paths in
/// logs and spans are bounded: a client must not write the log).
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let family = OutcomeFamily::default();
        let (queue, mut rx) = Queue::new(2, family.clone());
        for i in 0..5 {
            queue.push(i);
        }
        let dropped = family
            .get_or_create(&OutcomeLabels { outcome: "dropped" })
            .get();
        assert_eq!(dropped, 3);
        assert_eq!(rx.try_recv().ok(), Some(0));
        assert_eq!(rx.try_recv().ok(), Some(1));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn times_and_paths_are_written_as_logs_expect() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(at), "2023-11-14T22:13:20.123Z");
        assert_eq!(bounded("/short", 10), "/short");
        assert_eq!(bounded("/ééé", 3), "/é...");
    }
}
