//! TrafficPolicies as nodes apply them: each checked and compiled once
//! (durations, retry conditions, limits), kept per Service port.
//!
//! What acts where is said in [`crate::api::traffic`]; the defaults follow
//! Linkerd (retry budget 20% with 10 retries a second, over 10 s) and Envoy
//! (outlier detection: 5 consecutive 5xx, 30 s base ejection, at most 50% of
//! the endpoints ejected).

use std::{sync::Arc, time::Duration};

use crate::api::traffic::{LbAlgorithm, TrafficPolicySpec};

use super::services::ServiceId;
use crate::duration::gateway as gateway_duration;

/// An accepted TrafficPolicy, as the controller sends it to every node.
#[derive(Clone, Debug, PartialEq)]
pub struct AcceptedTraffic {
    pub namespace: String,
    pub name: String,
    pub spec: TrafficPolicySpec,
}

/// Why a TrafficPolicy cannot be accepted: the field and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {what}")]
pub struct TrafficError {
    pub field: &'static str,
    pub what: String,
}

fn invalid(field: &'static str, what: impl Into<String>) -> TrafficError {
    TrafficError {
        field,
        what: what.into(),
    }
}

/// The defaults named in the module's docs.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_millis(250);
pub const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_BUDGET_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_OUTLIER_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

/// One policy, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePolicy {
    /// `namespace/name` of the TrafficPolicy, for status and `lacewing routes`.
    pub policy: String,
    /// The whole request, retries included (`None`: no limit).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub breaker: Option<Breaker>,
    pub outlier: Option<Outlier>,
    pub fault: Option<Fault>,
    pub rate_limit: Option<RateLimit>,
    /// How the client's node picks an endpoint per request.
    pub balance: Balance,
    /// The kernel's algorithm for the Service's connections, if named.
    pub kernel_algorithm: Option<super::services::Algorithm>,
    /// The kernel's ClientIP affinity, if set.
    pub affinity_timeout_s: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub budget: Budget,
}

/// What a retry is made for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx, a failure to connect, or no answer.
    pub server_error: bool,
    /// 502, 503, 504, a failure to connect, or no answer.
    pub gateway_error: bool,
    /// No answer (the connection reset or closed after the request went).
    pub reset: bool,
    pub connect_failure: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// These HTTP statuses.
    pub statuses: Vec<u16>,
    /// These gRPC codes, in a response's headers (a call that failed before
    /// any message).
    pub grpc: Vec<u16>,
}

/// gRPC codes by the names `retryOn` uses.
const GRPC_CODES: [(&str, u16); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

impl RetryOn {
    /// The conditions `retryOn` names; the default when it names none.
    pub fn parse(items: &[String]) -> Result<Self, TrafficError> {
        let mut on = Self::default();
        let defaults = ["connect-failure", "reset", "gateway-error", "unavailable"];
        let items: Vec<&str> = if items.is_empty() {
            defaults.to_vec()
        } else {
            items.iter().map(String::as_str).collect()
        };
        for item in items {
            match item {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                other => {
                    if let Some((_, code)) = GRPC_CODES.iter().find(|(name, _)| *name == other) {
                        on.grpc.push(*code);
                    } else if let Ok(status @ 400..=599) = other.parse::<u16>() {
                        on.statuses.push(status);
                    } else {
                        return Err(invalid(
                            "spec.retries.retryOn",
                            format!(
                                "`{other}` is not one of 5xx, gateway-error, reset, connect-failure, retriable-4xx, an HTTP status from 400 to 599, or a gRPC code (cancelled, deadline-exceeded, resource-exhausted, internal, unavailable)"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(on)
    }

    /// Whether an answer with `status` (and gRPC status `grpc`, from its
    /// headers) is retried.
    pub fn answer(&self, status: u16, grpc: Option<u16>) -> bool {
        (self.server_error && (500..=599).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || self.statuses.contains(&status)
            || grpc.is_some_and(|g| self.grpc.contains(&g))
    }

    /// Whether a failure to connect is retried.
    pub fn connect(&self) -> bool {
        self.connect_failure || self.server_error || self.gateway_error
    }

    /// Whether a request that got no answer is retried.
    pub fn no_answer(&self) -> bool {
        self.reset || self.server_error || self.gateway_error
    }
}

/// Retries may add `percent` of the requests over `ttl`, and
/// `min_per_second` always.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub percent: f64,
    pub min_per_second: u32,
    pub ttl: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// 0: not counted.
    pub consecutive_5xx: u32,
    /// 0: not counted.
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    /// (share from 0 to 1, delay).
    pub delay: Option<(f64, Duration)>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Abort {
    /// From 0 to 1.
    pub share: f64,
    /// The answer: an HTTP status, or a gRPC code (to any client: a gRPC
    /// code is only asked for by gRPC services).
    pub answer: AbortAnswer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortAnswer {
    Http(u16),
    Grpc(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub quota: Quota,
    /// A limiter per source identity, each with the whole quota.
    pub per_source: bool,
    /// Sources whose identity ends with `/ns/<namespace>/sa/<name>`, with
    /// a quota of their own.
    pub overrides: Vec<(String, Quota)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    /// The override for a source with `identity`, if it has one.
    pub fn override_for(&self, identity: &str) -> Option<(usize, Quota)> {
        self.overrides
            .iter()
            .position(|(suffix, _)| identity.ends_with(suffix.as_str()))
            .map(|i| (i, self.overrides[i].1))
    }
}

/// The per-request endpoint choice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    #[default]
    PeakEwma,
    RoundRobin,
    /// On this header's value.
    Header(http::HeaderName),
    /// On this cookie's value.
    Cookie(String),
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PeakEwma => f.write_str("PeakEwma"),
            Self::RoundRobin => f.write_str("RoundRobin"),
            Self::Header(h) => write!(f, "ConsistentHash header {h}"),
            Self::Cookie(c) => write!(f, "ConsistentHash cookie {c}"),
        }
    }
}

fn duration(field: &'static str, text: Option<&String>) -> Result<Option<Duration>, TrafficError> {
    text.map(|t| {
        gateway_duration(t).ok_or_else(|| {
            invalid(
                field,
                format!("`{t}` is not a duration such as 500ms, 10s or 1m30s"),
            )
        })
    })
    .transpose()
}

fn percent(field: &'static str, p: f64) -> Result<f64, TrafficError> {
    if (0.0..=100.0).contains(&p) {
        Ok(p / 100.0)
    } else {
        Err(invalid(
            field,
            format!("{p} is not a percentage from 0 to 100"),
        ))
    }
}

/// Compiles the policy `namespace/name`; the first problem is the error.
pub fn compile(
    namespace: &str,
    name: &str,
    spec: &TrafficPolicySpec,
) -> Result<ServicePolicy, TrafficError> {
    let timeout = duration("spec.timeout", spec.timeout.as_ref())?.filter(|d| !d.is_zero());
    let retry = match &spec.retries {
        None => None,
        Some(r) => {
            if r.attempts > 10 {
                return Err(invalid(
                    "spec.retries.attempts",
                    format!("{} is more than 10", r.attempts),
                ));
            }
            let budget = r.budget.as_ref();
            let ttl = duration(
                "spec.retries.budget.ttl",
                budget.and_then(|b| b.ttl.as_ref()),
            )?
            .unwrap_or(DEFAULT_BUDGET_TTL);
            if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
                return Err(invalid(
                    "spec.retries.budget.ttl",
                    format!("{ttl:?} is not from 1s to 60s"),
                ));
            }
            let budget_percent = budget
                .and_then(|b| b.percent)
                .unwrap_or(DEFAULT_BUDGET_PERCENT);
            if !(0.0..=1000.0).contains(&budget_percent) {
                return Err(invalid(
                    "spec.retries.budget.percent",
                    format!("{budget_percent} is not from 0 to 1000"),
                ));
            }
            let backoff =
                duration("spec.retries.backoff", r.backoff.as_ref())?.unwrap_or(DEFAULT_BACKOFF);
            let max_backoff = duration("spec.retries.maxBackoff", r.max_backoff.as_ref())?
                .unwrap_or(DEFAULT_MAX_BACKOFF.max(backoff));
            if max_backoff < backoff {
                return Err(invalid(
                    "spec.retries.maxBackoff",
                    format!("{max_backoff:?} is shorter than backoff ({backoff:?})"),
                ));
            }
            Some(RetryPolicy {
                attempts: r.attempts,
                per_try_timeout: duration(
                    "spec.retries.perTryTimeout",
                    r.per_try_timeout.as_ref(),
                )?
                .filter(|d| !d.is_zero()),
                on: RetryOn::parse(&r.retry_on)?,
                backoff,
                max_backoff,
                budget: Budget {
                    percent: budget_percent / 100.0,
                    min_per_second: budget
                        .and_then(|b| b.min_retries_per_second)
                        .unwrap_or(DEFAULT_BUDGET_MIN_PER_SECOND),
                    ttl,
                },
            })
        }
    };
    let breaker = spec.circuit_breaker.as_ref().map(|c| Breaker {
        max_connections: c.max_connections,
        max_pending: c.max_pending_requests,
        max_requests: c.max_requests,
    });
    if let Some(b) = &breaker {
        if b.max_connections == Some(0) || b.max_requests == Some(0) {
            return Err(invalid(
                "spec.circuitBreaker",
                "maxConnections and maxRequests must be at least 1 (0 would refuse every request)",
            ));
        }
        if b.max_pending.is_some() && b.max_connections.is_none() {
            return Err(invalid(
                "spec.circuitBreaker.maxPendingRequests",
                "requests wait only for a connection: set maxConnections too",
            ));
        }
    }
    let outlier = match &spec.outlier_detection {
        None => None,
        Some(o) => {
            let max = o
                .max_ejection_percent
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT);
            if max > 100 {
                return Err(invalid(
                    "spec.outlierDetection.maxEjectionPercent",
                    format!("{max} is more than 100"),
                ));
            }
            let interval = duration("spec.outlierDetection.interval", o.interval.as_ref())?
                .unwrap_or(DEFAULT_OUTLIER_INTERVAL);
            let base = duration(
                "spec.outlierDetection.baseEjectionTime",
                o.base_ejection_time.as_ref(),
            )?
            .unwrap_or(DEFAULT_BASE_EJECTION);
            if interval.is_zero() || base.is_zero() {
                return Err(invalid(
                    "spec.outlierDetection",
                    "interval and baseEjectionTime must be longer than 0s",
                ));
            }
            Some(Outlier {
                consecutive_5xx: o.consecutive_5xx.unwrap_or(
                    if o.consecutive_gateway_errors.is_some() {
                        0
                    } else {
                        DEFAULT_CONSECUTIVE_5XX
                    },
                ),
                consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
                interval,
                base_ejection: base,
                max_ejection_percent: max,
            })
        }
    };
    let fault = match &spec.fault {
        None => None,
        Some(f) => Some(Fault {
            delay: f
                .delay
                .as_ref()
                .map(|d| -> Result<_, TrafficError> {
                    let share = percent("spec.fault.delay.percent", d.percent)?;
                    let delay = duration("spec.fault.delay.fixedDelay", Some(&d.fixed_delay))?
                        .unwrap_or_default();
                    Ok((share, delay))
                })
                .transpose()?,
            abort: f
                .abort
                .as_ref()
                .map(|a| -> Result<_, TrafficError> {
                    let share = percent("spec.fault.abort.percent", a.percent)?;
                    let answer = match (a.http_status, a.grpc_status) {
                        (Some(s @ 200..=599), None) => AbortAnswer::Http(s),
                        (None, Some(g @ 1..=16)) => AbortAnswer::Grpc(g),
                        (Some(s), None) => {
                            return Err(invalid(
                                "spec.fault.abort.httpStatus",
                                format!("{s} is not an HTTP status from 200 to 599"),
                            ));
                        }
                        (None, Some(g)) => {
                            return Err(invalid(
                                "spec.fault.abort.grpcStatus",
                                format!("{g} is not a gRPC code from 1 to 16"),
                            ));
                        }
                        _ => {
                            return Err(invalid(
                                "spec.fault.abort",
                                "set exactly one of httpStatus and grpcStatus",
                            ));
                        }
                    };
                    Ok(Abort { share, answer })
                })
                .transpose()?,
        }),
    };
    let rate_limit = match &spec.rate_limit {
        None => None,
        Some(r) => {
            let quota = |field: &'static str, per_second: u32, burst: Option<u32>| {
                let q = Quota {
                    per_second,
                    burst: burst.unwrap_or(per_second),
                };
                if q.per_second == 0 || q.burst == 0 {
                    return Err(invalid(
                        field,
                        "requestsPerSecond and burst must be at least 1",
                    ));
                }
                Ok(q)
            };
            let overrides = r
                .overrides
                .iter()
                .map(|o| {
                    let Some((ns, name)) =
                        o.service_account.split_once('/').filter(|(ns, name)| {
                            !ns.is_empty() && !name.is_empty() && !name.contains('/')
                        })
                    else {
                        return Err(invalid(
                            "spec.rateLimit.overrides",
                            format!(
                                "serviceAccount `{}` must be namespace/name",
                                o.service_account
                            ),
                        ));
                    };
                    Ok((
                        format!("/ns/{ns}/sa/{name}"),
                        quota("spec.rateLimit.overrides", o.requests_per_second, o.burst)?,
                    ))
                })
                .collect::<Result<_, _>>()?;
            Some(RateLimit {
                quota: quota("spec.rateLimit", r.requests_per_second, r.burst)?,
                per_source: r.per_source,
                overrides,
            })
        }
    };
    let balance = match &spec.load_balancer {
        None => Balance::PeakEwma,
        Some(lb) => {
            if lb.maglev_table_size.is_some() && lb.algorithm != LbAlgorithm::Maglev {
                return Err(invalid(
                    "spec.loadBalancer.maglevTableSize",
                    "applies to the Maglev algorithm only",
                ));
            }
            if let Some(size) = lb.maglev_table_size
                && (size > 131_071 || !mesh_common::maglev::is_prime(size))
            {
                return Err(invalid(
                    "spec.loadBalancer.maglevTableSize",
                    format!("{size} is not a prime between 2 and 131071 (16381 when absent)"),
                ));
            }
            if lb.consistent_hash.is_some() && lb.algorithm != LbAlgorithm::ConsistentHash {
                return Err(invalid(
                    "spec.loadBalancer.consistentHash",
                    "applies to the ConsistentHash algorithm only",
                ));
            }
            match lb.algorithm {
                // Per connection, in the kernel: requests keep the default.
                LbAlgorithm::Random | LbAlgorithm::Maglev | LbAlgorithm::PeakEwma => {
                    Balance::PeakEwma
                }
                LbAlgorithm::RoundRobin => Balance::RoundRobin,
                LbAlgorithm::ConsistentHash => {
                    match lb.consistent_hash.as_ref().map(|h| (&h.header, &h.cookie)) {
                        Some((Some(h), None)) => Balance::Header(
                            http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                                invalid(
                                    "spec.loadBalancer.consistentHash.header",
                                    format!("`{h}` is not an HTTP header name"),
                                )
                            })?,
                        ),
                        Some((None, Some(c))) if !c.is_empty() => Balance::Cookie(c.clone()),
                        _ => {
                            return Err(invalid(
                                "spec.loadBalancer.consistentHash",
                                "set exactly one of header and cookie",
                            ));
                        }
                    }
                }
            }
        }
    };
    let kernel_algorithm = spec
        .load_balancer
        .as_ref()
        .and_then(|lb| match lb.algorithm {
            LbAlgorithm::Random => Some(super::services::Algorithm::Random),
            LbAlgorithm::Maglev => Some(super::services::Algorithm::Maglev {
                table_size: lb
                    .maglev_table_size
                    .unwrap_or(mesh_common::lb::MAGLEV_DEFAULT_SIZE),
            }),
            _ => None,
        });
    Ok(ServicePolicy {
        policy: format!("{namespace}/{name}"),
        kernel_algorithm,
        affinity_timeout_s: spec
            .session_affinity
            .as_ref()
            .map(|a| a.client_ip_timeout_seconds),
        timeout,
        retry,
        breaker,
        outlier,
        fault,
        rate_limit,
        balance,
    })
}

impl ServicePolicy {
    /// Whether a client's node must read the Service's requests for this
    /// policy (its frontend is then routed per request, as an HTTPRoute
    /// would make it). A rate limit acts at the destination, the kernel
    /// algorithms per connection.
    pub fn needs_requests(&self) -> bool {
        self.timeout.is_some()
            || self.retry.is_some()
            || self.breaker.is_some()
            || self.outlier.is_some()
            || self.fault.is_some()
            || self.balance != Balance::PeakEwma
    }
}

/// A policy and the port it is bound to (`None`: every port).
type Bound = (Option<u16>, Arc<ServicePolicy>);

/// The compiled policies by Service, each bound to a port or to all ports.
#[derive(Clone, Debug, Default)]
pub struct PolicyTable {
    by_service: std::collections::HashMap<ServiceId, Vec<Bound>>,
}

impl PolicyTable {
    /// The table of `policies`. Of two policies for the same Service port
    /// the one whose `namespace/name` sorts first applies (the controller
    /// marks the other `Conflicted`); one for a port wins over one for all.
    pub fn build(policies: &[AcceptedTraffic]) -> Self {
        let mut sorted: Vec<&AcceptedTraffic> = policies.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut out = Self::default();
        for p in sorted {
            let Ok(compiled) = compile(&p.namespace, &p.name, &p.spec) else {
                continue;
            };
            let list = out
                .by_service
                .entry((p.namespace.clone(), p.spec.target_ref.name.clone()))
                .or_default();
            if list.iter().all(|(port, _)| *port != p.spec.target_ref.port) {
                list.push((p.spec.target_ref.port, Arc::new(compiled)));
            }
        }
        out
    }

    /// The policy for `port` of `service`, if any.
    pub fn get(&self, service: &ServiceId, port: u16) -> Option<&Arc<ServicePolicy>> {
        let list = self.by_service.get(service)?;
        list.iter()
            .find(|(p, _)| *p == Some(port))
            .or_else(|| list.iter().find(|(p, _)| p.is_none()))
            .map(|(_, policy)| policy)
    }

    /// Every Service with a policy.
    pub fn services(&self) -> impl Iterator<Item = &ServiceId> {
        self.by_service.keys()
    }
}

#[cfg(test)]
mod tests;
