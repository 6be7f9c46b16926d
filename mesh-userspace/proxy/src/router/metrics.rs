//! Request metrics of the routed (source) side, on the node's `:15020`:
//! `lacewing_requests_total` and `lacewing_request_duration_seconds` by
//! source workload and namespace, destination Service, route, status and
//! gRPC status; retries and timeouts by route; mirrored requests by the
//! Service mirrored to. No path or user-agent label: cardinality stays
//! bounded by the routes and workloads that exist.

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
    pub route: String,
    pub code: String,
    pub grpc_status: String,
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
        }
    }
}

impl RequestMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "lacewing_requests",
            "HTTP requests routed by this node, by source, destination Service, route and status",
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
        m
    }

    pub fn fallback(&self, reason: &'static str) {
        self.fallbacks
            .get_or_create(&FallbackLabels { reason })
            .inc();
    }

    pub fn record(
        &self,
        source: &Workload,
        frontend: &Frontend,
        route: &str,
        code: u16,
        grpc_status: &str,
        took: Duration,
    ) {
        let labels = RequestLabels {
            direction: "outbound",
            source_workload: source.name.clone(),
            source_namespace: source.namespace.clone(),
            destination_service: format!("{}/{}", frontend.service.0, frontend.service.1),
            route: route.to_owned(),
            code: code.to_string(),
            grpc_status: grpc_status.to_owned(),
        };
        self.requests.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
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
