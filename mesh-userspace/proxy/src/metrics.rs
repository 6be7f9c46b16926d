//! Request metrics, on the node's `:15020`, from the source side (the
//! router: `direction="outbound"`) and the destination side (requests a
//! pod's L7 policy decides: `direction="inbound"`):
//! `lacewing_requests_total` and `lacewing_request_duration_seconds` by
//! source workload and namespace, destination Service, workload and
//! namespace, route, status and gRPC status; retries and timeouts by route;
//! mirrored requests by the Service mirrored to. No path or user-agent
//! label: cardinality stays bounded by the routes and workloads that exist.
//! What a side cannot know is empty: the source does not know which pod
//! answers (`destination_workload`), the destination does not know the
//! Service dialled or the client's pod (only its proven identity's
//! namespace).

use std::time::Duration;

use lacewing_core::model::{routes::Frontend, workloads::Workload};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub source_workload: String,
    pub source_namespace: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub route: String,
    pub code: String,
    pub grpc_status: String,
    /// What the mesh did besides carrying it (`fault_abort`,
    /// `fault_delay`, `circuit_open`, `timeout`, ...): empty when it only
    /// carried it.
    pub mesh_flag: &'static str,
}

impl RequestLabels {
    /// A request the source's router answered (`route`: the route that
    /// chose it, or empty).
    pub fn outbound(
        source: &Workload,
        frontend: &Frontend,
        route: &str,
        code: u16,
        grpc_status: &str,
        mesh_flag: &'static str,
    ) -> Self {
        Self {
            direction: "outbound",
            source_workload: source.name.clone(),
            source_namespace: source.namespace.clone(),
            destination_service: format!("{}/{}", frontend.service.0, frontend.service.1),
            destination_workload: String::new(),
            destination_namespace: frontend.service.0.clone(),
            route: route.to_owned(),
            code: code.to_string(),
            grpc_status: grpc_status.to_owned(),
            mesh_flag,
        }
    }

    /// A request the destination decided for `pod`, from a peer whose
    /// proven identity is `identity` (its namespace is the label).
    pub fn inbound(identity: &str, pod: &Workload, code: u16, grpc_status: &str) -> Self {
        let source_namespace = namespace_of(identity).unwrap_or_default();
        Self {
            direction: "inbound",
            source_workload: String::new(),
            source_namespace: source_namespace.to_owned(),
            destination_service: String::new(),
            destination_workload: pod.name.clone(),
            destination_namespace: pod.namespace.clone(),
            route: String::new(),
            code: code.to_string(),
            grpc_status: grpc_status.to_owned(),
            mesh_flag: "",
        }
    }
}

/// The namespace of a SPIFFE identity (`spiffe://td/ns/<this>/sa/...`).
pub fn namespace_of(identity: &str) -> Option<&str> {
    identity.split("/ns/").nth(1)?.split('/').next()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub destination_service: String,
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub destination_service: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    retries: Family<RouteLabels, Counter>,
    timeouts: Family<RouteLabels, Counter>,
    mirrored: Family<MirrorLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    events: Family<EventLabels, Counter>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            retries: Family::default(),
            timeouts: Family::default(),
            mirrored: Family::default(),
            fallbacks: Family::default(),
            events: Family::default(),
        }
    }
}

impl RequestMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "lacewing_requests",
            "HTTP requests this node routed (outbound) or decided for a pod here (inbound), by source, destination, route and status",
            m.requests.clone(),
        );
        registry.register(
            "lacewing_request_duration_seconds",
            "Time from a routed request's arrival to its response headers",
            m.durations.clone(),
        );
        registry.register(
            "lacewing_request_retries",
            "Retried attempts of routed requests, by route",
            m.retries.clone(),
        );
        registry.register(
            "lacewing_request_timeouts",
            "Routed requests answered 504 because a route's timeout expired, by route",
            m.timeouts.clone(),
        );
        registry.register(
            "lacewing_requests_mirrored",
            "Copies of routed requests sent to a RequestMirror backend (apart from the requests)",
            m.mirrored.clone(),
        );
        registry.register(
            "lacewing_l7_fallbacks",
            "Connections to a routed Service carried at L4 instead, by reason (not_http: the first bytes were not HTTP; silent: nothing sent in time, as a server-first protocol)",
            m.fallbacks.clone(),
        );
        registry.register(
            "lacewing_traffic_policy_events",
            "What TrafficPolicies did at this node, by destination Service: fault_abort, fault_delay (injected faults), circuit_open (requests the circuit breaker refused), ejection (endpoints outlier detection ejected), retry_budget_exhausted (retries the budget did not allow)",
            m.events.clone(),
        );
        m
    }

    pub fn event(&self, service: &str, event: &'static str) {
        self.events
            .get_or_create(&EventLabels {
                destination_service: service.to_owned(),
                event,
            })
            .inc();
    }

    pub fn fallback(&self, reason: &'static str) {
        self.fallbacks
            .get_or_create(&FallbackLabels { reason })
            .inc();
    }

    pub fn record(&self, labels: &RequestLabels, took: Duration) {
        self.requests.get_or_create(labels).inc();
        self.durations
            .get_or_create(labels)
            .observe(took.as_secs_f64());
    }

    pub fn retry(&self, route: &str) {
        self.retries
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    pub fn timeout(&self, route: &str) {
        self.timeouts
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    pub fn mirrored(&self, service: &str) {
        self.mirrored
            .get_or_create(&MirrorLabels {
                destination_service: service.to_owned(),
            })
            .inc();
    }
}

/// Records a request's metrics once its response ends, given its gRPC
/// status and the bytes of its body.
pub type Record = Box<dyn FnOnce(&str, u64) + Send + Sync>;

/// `resp` with a body that calls `record` when it ends (or is dropped),
/// with the gRPC status of its trailers (or of its headers, for an answer
/// without a body) and the bytes of body it carried.
pub fn observe<B>(
    resp: http::Response<B>,
    record: impl FnOnce(&str, u64) + Send + Sync + 'static,
) -> http::Response<http_body_util::combinators::BoxBody<bytes::Bytes, B::Error>>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + Unpin + 'static,
{
    let grpc_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default();
    resp.map(|inner| {
        http_body_util::BodyExt::boxed(Observed {
            inner,
            grpc_status,
            bytes: 0,
            record: Some(Box::new(record)),
        })
    })
}

struct Observed<B> {
    inner: B,
    grpc_status: String,
    bytes: u64,
    record: Option<Record>,
}

impl<B> Observed<B> {
    fn finish(&mut self) {
        if let Some(record) = self.record.take() {
            record(&self.grpc_status, self.bytes);
        }
    }
}

impl<B> hyper::body::Body for Observed<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    self.grpc_status = status.to_owned();
                }
            }
            std::task::Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.finish();
    }
}
