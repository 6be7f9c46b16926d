//! `TrafficPolicy`: how traffic to one Service behaves: timeouts, retries,
//! circuit breaking, outlier detection, rate limits, fault injection, load
//! balancing and session affinity.
//!
//! Who acts on which field (docs/traffic-policy.md has examples):
//! - the client's node, for requests a meshed client sends to the Service's
//!   frontend: `timeout`, `retries`, `fault` (an HTTPRoute rule's own
//!   timeouts and retry win over the policy's);
//! - the client's node, for requests it sends to the Service's endpoints
//!   (the frontend dialled, or an HTTPRoute backend): `circuitBreaker`,
//!   `outlierDetection`, and the per-request `loadBalancer` algorithms;
//! - the destination's node, for the Service's pods: `rateLimit`;
//! - the kernel, per connection: `loadBalancer` `Random` and `Maglev`,
//!   `sessionAffinity.clientIP`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::PolicyStatus;

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lacewing.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "tp",
    validation = "!has(self.spec.loadBalancer) || self.spec.loadBalancer.algorithm == 'Maglev' || !has(self.spec.loadBalancer.maglevTableSize)",
    validation = "!has(self.spec.loadBalancer) || self.spec.loadBalancer.algorithm != 'ConsistentHash' || has(self.spec.loadBalancer.consistentHash)",
    validation = "!has(self.spec.fault) || !has(self.spec.fault.abort) || has(self.spec.fault.abort.httpStatus) != has(self.spec.fault.abort.grpcStatus)"
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service (in the policy's namespace) this policy applies to.
    pub target_ref: ServiceRef,
    /// Whole-request timeout, retries included, e.g. `5s` (`0s`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    pub name: String,
    /// One port of the Service; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first try.
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Each try's own timeout, e.g. `500ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// What is retried: `5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `retriable-4xx`, an HTTP status (`503`), or a gRPC code (`unavailable`,
    /// `resource-exhausted`, `cancelled`, `deadline-exceeded`, `internal`).
    /// Empty: `connect-failure`, `reset`, `gateway-error`, `unavailable`.
    #[serde(default)]
    pub retry_on: Vec<String>,
    /// The first retry's delay (it doubles for each next one, up to
    /// `maxBackoff`, with up to half of it again at random); `25ms` when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// `250ms` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<String>,
    /// How many retries the client's node may add over its requests to the
    /// Service; the default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// Retries may add at most `percent` of the requests (over the last
/// `ttl`), and `minRetriesPerSecond` are always allowed (Linkerd's budget).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// 20 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub percent: Option<f64>,
    /// 10 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub min_retries_per_second: Option<u32>,
    /// `10s` when absent (from 1s to 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// HTTP/1.1 connections the client's node holds to the Service's
    /// endpoints (each carries one request at a time): requests past it
    /// wait, up to `maxPendingRequests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection; past it, 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the Service from the node; past it, 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or failures to connect or to answer) that
    /// eject an endpoint; 5 when absent, 0 turns it off.
    #[serde(
        default,
        rename = "consecutive5xx",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive gateway errors (502, 503, 504, failures to connect or to
    /// answer) that eject an endpoint; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// The failures count only within this time of the first one; `10s`
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// An endpoint is ejected for this times its number of ejections; `30s`
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// At most this share of the Service's endpoints is ejected at once; 50
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Requests each of the Service's pods accepts (at L4, for a port that is
/// not declared HTTP: connections it accepts), decided by the pod's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    /// Requests allowed at once above the rate; `requestsPerSecond` when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// Each source identity gets the whole rate (one noisy client cannot use
    /// another's share); else the clients share it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
    /// Source ServiceAccounts with a rate of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitOverride {
    /// `namespace/name` of the clients' ServiceAccount.
    pub service_account: String,
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    pub fixed_delay: String,
}

/// Answers a share of requests itself: an HTTP status to HTTP clients, or a
/// gRPC code (a number, 1 to 16) to gRPC clients; one of the two.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub grpc_status: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    pub algorithm: LbAlgorithm,
    /// Maglev only: a prime; 16381 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    /// ConsistentHash only: what requests are hashed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LbAlgorithm {
    /// The kernel, per connection, weighted at random (the default at L4).
    Random,
    /// The kernel, per connection, Maglev consistent hashing.
    Maglev,
    /// The client's node, per request: power of two choices over peak-EWMA
    /// latency (the default for HTTP).
    PeakEwma,
    /// The client's node, per request, in turn.
    RoundRobin,
    /// The client's node, per request, on a header or cookie.
    ConsistentHash,
}

/// Exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinity {
    /// The kernel keeps a client address on its backend this long.
    #[schemars(range(min = 1, max = 86400))]
    pub client_ip_timeout_seconds: u32,
}
