//! Trace spans: W3C Trace Context (`traceparent`, `tracestate`) read from
//! and written to the requests the node carries, the node's own span for
//! each side of a request, exported over OTLP/gRPC to a collector.
//!
//! A request with a sampled `traceparent` is always traced (the caller
//! decided); one without gets a new trace at the node's sampling rate; one
//! whose `traceparent` says "not sampled" is passed on as it is, with no
//! span. The node's span becomes the parent of what it forwards, so the
//! client's span, the source node's, the destination node's and the
//! server's are linked in that order.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderValue};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span},
};

use super::{OutcomeFamily, Queue};

pub const TRACEPARENT: &str = "traceparent";
/// Spans wait at most this long to be exported: at most this many exports
/// a second, whatever the request rate.
const BATCH_INTERVAL: Duration = Duration::from_millis(200);
const MAX_BATCH: usize = 2048;
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A request's place in a trace, as its `traceparent` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub parent: [u8; 8],
    pub sampled: bool,
}

/// Parses a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`. All
/// zero ids are invalid (W3C), as is anything else: such a header is
/// treated as absent.
pub fn parse(value: &str) -> Option<Context> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // A later version may add fields; version 00 has exactly four.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id: [u8; 16] = hex(trace)?;
    let parent: [u8; 8] = hex(parent)?;
    let flags: [u8; 1] = hex(flags)?;
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some(Context {
        trace_id,
        parent,
        sampled: flags[0] & 1 == 1,
    })
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N
        || !text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `SPAN_KIND_CLIENT` for the source node's span (it sends the request
/// on), `SPAN_KIND_SERVER` for the destination's (it receives it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Client,
    Server,
}

/// A span being recorded.
#[derive(Debug)]
pub struct ActiveSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: String,
    kind: Kind,
    start: SystemTime,
    attributes: Attributes,
    events: Vec<Event>,
}

/// A span's attributes, by OpenTelemetry's names.
pub type Attributes = Vec<(&'static str, Value)>;

/// Something that happened during a span (a retry): when, what, details.
type Event = (SystemTime, &'static str, Attributes);

#[derive(Clone, Debug)]
pub enum Value {
    Text(String),
    Int(i64),
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Self::Int(n)
    }
}

impl ActiveSpan {
    pub fn attribute(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push((key, value.into()));
    }

    /// An event that happened at `at` (a retry, ...).
    pub fn event_at(&mut self, at: SystemTime, name: &'static str, attributes: Attributes) {
        self.events.push((at, name, attributes));
    }

    /// The request and its answer, by OpenTelemetry's HTTP and gRPC names
    /// (a 5xx or a failed gRPC status marks the span as an error).
    pub fn answered(&mut self, method: &str, path: &str, code: u16, grpc_status: &str) {
        self.attribute("http.request.method", method);
        self.attribute("url.path", path);
        self.attribute("http.response.status_code", i64::from(code));
        if let Ok(status) = grpc_status.parse::<i64>() {
            self.attribute("rpc.grpc.status_code", status);
        }
    }

    /// The trace id, as logs show it.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The `traceparent` of what this span sends on: this span is its
    /// parent.
    pub fn traceparent(&self) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "00-{}-{}-01",
            to_hex(&self.trace_id),
            to_hex(&self.span_id)
        ))
        .expect("hex is a valid header value")
    }

    /// Sets this span as the parent in `headers` (the `tracestate` the
    /// client sent is passed on unchanged).
    pub fn propagate(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent());
    }
}

/// Starts spans and exports them.
pub struct Tracer {
    queue: Queue<ActiveSpan>,
    /// The share of requests without a `traceparent` that start a trace.
    sampling: f64,
}

impl Tracer {
    /// Exports to the OTLP/gRPC `endpoint` (`http://host:4317`) as node
    /// `node`; spans that cannot be queued or exported are counted in
    /// `outcomes` as dropped. Must run in a Tokio runtime.
    pub fn start(
        endpoint: &str,
        node: &str,
        sampling: f64,
        capacity: usize,
        outcomes: OutcomeFamily,
    ) -> Result<Arc<Self>, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .timeout(EXPORT_TIMEOUT)
            .connect_timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (queue, mut rx) = Queue::new(capacity, outcomes.clone());
        let resource = Resource {
            attributes: vec![
                attr("service.name", "lacewing-node".into()),
                attr("k8s.node.name", node.into()),
            ],
            ..Resource::default()
        };
        tokio::spawn(async move {
            let mut client = TraceServiceClient::new(channel);
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let n = batch.len() as u64;
                let request = ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "lacewing".into(),
                                version: env!("CARGO_PKG_VERSION").into(),
                                ..InstrumentationScope::default()
                            }),
                            spans: batch.drain(..).map(encode).collect(),
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    }],
                };
                match client.export(request).await {
                    Ok(_) => super::count(&outcomes, "exported", n),
                    Err(status) => {
                        // The collector is down or refuses: these spans are
                        // lost (counted); requests never waited for them.
                        tracing::debug!(%status, spans = n, "exporting spans failed");
                        super::count(&outcomes, "dropped", n);
                    }
                }
                tokio::time::sleep(BATCH_INTERVAL).await;
            }
        });
        Ok(Arc::new(Self { queue, sampling }))
    }

    /// The node's span for a request with `headers`, if it is traced: its
    /// `traceparent`'s trace (when sampled), or a new one at the sampling
    /// rate. `name` is called only for a traced request (most are not).
    pub fn start_span(
        &self,
        headers: &HeaderMap,
        name: impl FnOnce() -> String,
        kind: Kind,
    ) -> Option<ActiveSpan> {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse);
        let (trace_id, parent) = match incoming {
            Some(c) if c.sampled => (c.trace_id, Some(c.parent)),
            Some(_) => return None,
            None if self.sampling > 0.0 && fastrand::f64() < self.sampling => (random_id(), None),
            None => return None,
        };
        Some(ActiveSpan {
            trace_id,
            span_id: random_id(),
            parent,
            name: name(),
            kind,
            start: SystemTime::now(),
            attributes: Vec::new(),
            events: Vec::new(),
        })
    }

    /// Ends `span` now and queues it for export.
    pub fn finish(&self, span: ActiveSpan) {
        self.queue.push(span);
    }
}

/// A random non-zero id.
fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0; N];
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
        if id != [0; N] {
            return id;
        }
    }
}

fn attr(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(match value {
                Value::Text(s) => any_value::Value::StringValue(s),
                Value::Int(n) => any_value::Value::IntValue(n),
            }),
        }),
    }
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// An error status: the attribute `http.response.status_code` is a 5xx or
/// `rpc.grpc.status_code` is not OK (OpenTelemetry's HTTP and gRPC
/// conventions).
fn failed(attributes: &[(&'static str, Value)]) -> bool {
    attributes.iter().any(|(k, v)| match (*k, v) {
        ("http.response.status_code", Value::Int(code)) => *code >= 500,
        ("rpc.grpc.status_code", Value::Int(code)) => *code != 0,
        _ => false,
    })
}

fn encode(s: ActiveSpan) -> Span {
    let end = SystemTime::now();
    let error = failed(&s.attributes);
    Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: s.name,
        kind: match s.kind {
            Kind::Client => span::SpanKind::Client,
            Kind::Server => span::SpanKind::Server,
        } as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(end),
        attributes: s.attributes.into_iter().map(|(k, v)| attr(k, v)).collect(),
        events: s
            .events
            .into_iter()
            .map(|(at, name, attributes)| span::Event {
                time_unix_nano: nanos(at),
                name: name.to_owned(),
                attributes: attributes.into_iter().map(|(k, v)| attr(k, v)).collect(),
                dropped_attributes_count: 0,
            })
            .collect(),
        status: Some(Status {
            code: if error {
                opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error
            } else {
                opentelemetry_proto::tonic::trace::v1::status::StatusCode::Unset
            } as i32,
            message: String::new(),
        }),
        ..Span::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_as_w3c_says() {
        let c = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(to_hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&c.parent), "00f067aa0ba902b7");
        assert!(c.sampled);
        assert!(
            !parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampled
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_span_continues_the_callers_trace_and_parents_what_it_sends() {
        let tracer = Tracer::start(
            "http://127.0.0.1:9",
            "n0",
            0.0,
            16,
            OutcomeFamily::default(),
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        assert!(
            tracer
                .start_span(&headers, || "x".into(), Kind::Client)
                .is_none(),
            "0% sampling and no traceparent: no span"
        );
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let span = tracer
            .start_span(&headers, || "x".into(), Kind::Client)
            .unwrap();
        assert_eq!(span.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        span.propagate(&mut headers);
        let sent = parse(headers[TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(
            (sent.trace_id, sent.parent, sent.sampled),
            (span.trace_id, span.span_id, true)
        );
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        assert!(
            tracer
                .start_span(&headers, || "x".into(), Kind::Client)
                .is_none(),
            "the caller said not sampled"
        );
    }
}
