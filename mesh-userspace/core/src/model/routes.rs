//! HTTPRoutes (GAMMA) as a node applies them: each route's rules checked
//! and compiled once (regular expressions, durations, filters), gathered
//! per Service in Gateway API's precedence order, and chosen per request.
//!
//! Binding, as GEP-1294 says for a mesh:
//! - a route applies to a Service it names as a parent, by the frontend the
//!   client dialled (never by the Host header); with `parentRef.port`, to
//!   that Service port only;
//! - a *producer* route (in the Service's namespace) applies to every
//!   client; a *consumer* route (in another namespace) only to clients of
//!   its own namespace, and for them it replaces the producer routes.
//!
//! Precedence between rules of all the routes of a Service (Gateway API):
//! an `Exact` path before a `RegularExpression` path before a `PathPrefix`
//! (each longer value first), then a rule with a method match, then more
//! header matches, then more query matches; ties go to the older route,
//! then to `namespace/name` in alphabetical order, then to the rule (and
//! match) listed first. (Where regular expressions sit is Lacewing's
//! choice, as Gateway API leaves it to implementations; Linkerd orders them
//! the same way.) A request no rule matches gets 404.

use std::{cmp::Ordering, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

use crate::api::http_route::{
    BackendRef, HeaderModifier, HttpPathMatch, HttpRouteFilter, HttpRouteRule, HttpRouteSpec,
    HttpValueMatch, PathModifier,
};

/// An accepted HTTPRoute, as the controller sends it to every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedRoute {
    pub namespace: String,
    pub name: String,
    /// Creation time (Unix seconds; 0 when unknown, as in a folder): older
    /// routes win ties.
    pub created: i64,
    pub spec: HttpRouteSpec,
}

use crate::model::services::ServiceId;

/// The routes of every Service that has any, compiled. A route that does
/// not compile is left out (the controller never accepts one).
pub fn table(routes: &[AcceptedRoute]) -> std::collections::BTreeMap<ServiceId, ServiceRoutes> {
    let mut table: std::collections::BTreeMap<ServiceId, ServiceRoutes> = Default::default();
    for route in routes {
        let id = RouteId {
            namespace: route.namespace.clone(),
            name: route.name.clone(),
        };
        let Ok(rules) = compile(&id, &route.spec) else {
            continue;
        };
        for parent in route.spec.parent_refs.iter().filter(|p| p.is_service()) {
            let namespace = parent
                .namespace
                .clone()
                .unwrap_or_else(|| route.namespace.clone());
            let consumer = (namespace != route.namespace).then(|| route.namespace.clone());
            table
                .entry((namespace, parent.name.clone()))
                .or_default()
                .add(rules.clone(), parent.port, consumer, route.created);
        }
    }
    table
}

/// A Service frontend that routes apply to, as a node routes it.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub service: ServiceId,
    /// The Service port dialled.
    pub port: u16,
    pub routes: std::sync::Arc<ServiceRoutes>,
    /// What the port says it speaks (`Http`: no need to read its first
    /// bytes to tell).
    pub app_protocol: crate::model::services::AppProtocol,
    /// The Service port's TrafficPolicy: its timeout, retries and faults
    /// apply to requests to this frontend (a rule's own settings win).
    pub policy: Option<std::sync::Arc<super::traffic::ServicePolicy>>,
}

/// A pod endpoint's rate limit, as its node enforces it.
#[derive(Clone, Debug)]
pub struct Limited {
    pub service: ServiceId,
    pub policy: std::sync::Arc<super::traffic::ServicePolicy>,
    /// Per request (the Service port says it is HTTP), else per connection.
    pub per_request: bool,
}

/// What a node routes by: the frontends with routes (an HTTPRoute, or a
/// TrafficPolicy that acts per request), the endpoints of every TCP Service
/// port (what `backendRefs` name), and the TrafficPolicies by Service.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    frontends: std::collections::HashMap<std::net::SocketAddr, Frontend>,
    policies: super::traffic::PolicyTable,
    /// Pods (address and port) a TrafficPolicy's rate limit applies to.
    limited: std::collections::HashMap<std::net::SocketAddr, Limited>,
    /// By Service, then port: looked up per request without copying the
    /// Service's name.
    endpoints: std::collections::HashMap<
        ServiceId,
        std::collections::HashMap<u16, Vec<crate::model::services::BackendEntry>>,
    >,
}

impl RouteTable {
    /// The table for `routes` and `traffic` policies over `services` (their
    /// entries name them `namespace/name:port`). A Service port with no
    /// route whose policy acts per request gets one rule that sends every
    /// request to the Service itself (Gateway API's behaviour without a
    /// route), so the policy applies to it.
    pub fn build<'a>(
        routes: &[AcceptedRoute],
        traffic: &[super::traffic::AcceptedTraffic],
        services: impl IntoIterator<Item = &'a crate::model::services::ServiceEntry>,
    ) -> Self {
        let by_service: std::collections::BTreeMap<ServiceId, std::sync::Arc<ServiceRoutes>> =
            table(routes)
                .into_iter()
                .map(|(k, v)| (k, std::sync::Arc::new(v)))
                .collect();
        let mut out = Self {
            policies: super::traffic::PolicyTable::build(traffic),
            ..Self::default()
        };
        for entry in services {
            if entry.protocol != crate::model::services::Protocol::Tcp {
                continue;
            }
            let Some((service, port)) = entry.service_port() else {
                continue;
            };
            let policy = out.policies.get(&service, port).cloned();
            if let Some(p) = policy.as_ref().filter(|p| p.rate_limit.is_some()) {
                for b in &entry.backends {
                    out.limited.insert(
                        b.addr,
                        Limited {
                            service: service.clone(),
                            policy: std::sync::Arc::clone(p),
                            per_request: entry.app_protocol
                                == crate::model::services::AppProtocol::Http,
                        },
                    );
                }
            }
            let routes = match by_service.get(&service) {
                Some(routes) if routes.binds_port(port) => Some(std::sync::Arc::clone(routes)),
                _ => policy
                    .as_ref()
                    .filter(|p| p.needs_requests())
                    .map(|_| std::sync::Arc::new(ServiceRoutes::to_itself(&service, port))),
            };
            // A port that says it is not HTTP is never routed.
            if let Some(routes) = routes
                && entry.app_protocol != crate::model::services::AppProtocol::Opaque
            {
                out.frontends.insert(
                    entry.frontend,
                    Frontend {
                        service: service.clone(),
                        port,
                        routes,
                        app_protocol: entry.app_protocol,
                        policy,
                    },
                );
            }
            out.endpoints
                .entry(service)
                .or_default()
                .entry(port)
                .or_default()
                .extend(entry.backends.iter().copied());
        }
        for list in out
            .endpoints
            .values_mut()
            .flat_map(|ports| ports.values_mut())
        {
            list.sort();
            list.dedup();
        }
        out
    }

    /// The routes of the frontend `addr` dialled, if it has any.
    pub fn frontend(&self, addr: std::net::SocketAddr) -> Option<&Frontend> {
        self.frontends.get(&addr)
    }

    /// The rate limit of the pod endpoint `dest`, if a TrafficPolicy sets
    /// one for a Service it serves.
    pub fn limited(&self, dest: std::net::SocketAddr) -> Option<&Limited> {
        self.limited.get(&dest)
    }

    /// Whether a rate limit applies to any port of the pod at `ip`.
    pub fn limits_address(&self, ip: std::net::IpAddr) -> bool {
        self.limited.keys().any(|a| a.ip() == ip)
    }

    /// The TrafficPolicy of a Service port, if any.
    pub fn policy(
        &self,
        service: &ServiceId,
        port: u16,
    ) -> Option<&std::sync::Arc<super::traffic::ServicePolicy>> {
        self.policies.get(service, port)
    }

    /// Every routed frontend.
    pub fn frontends(&self) -> impl Iterator<Item = (&std::net::SocketAddr, &Frontend)> {
        self.frontends.iter()
    }

    /// The ready endpoints of a Service port (both families).
    pub fn endpoints(
        &self,
        service: &ServiceId,
        port: u16,
    ) -> &[crate::model::services::BackendEntry] {
        self.endpoints
            .get(service)
            .and_then(|ports| ports.get(&port))
            .map_or(&[], Vec::as_slice)
    }
}

impl std::fmt::Display for ValueMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(v) => write!(f, "={v}"),
            Self::Regex(r) => write!(f, "~{}", r.as_str()),
        }
    }
}

/// `PathPrefix /v2, header x-canary=1, query q~^a, method GET`.
impl std::fmt::Display for Match {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            PathMatch::Exact(p) => write!(f, "Exact {p}")?,
            PathMatch::Prefix(p) => write!(f, "PathPrefix {p}")?,
            PathMatch::Regex(r) => write!(f, "RegularExpression {}", r.as_str())?,
        }
        for (name, value) in &self.headers {
            write!(f, ", header {name}{value}")?;
        }
        for (name, value) in &self.query {
            write!(f, ", query {name}{value}")?;
        }
        if let Some(m) = &self.method {
            write!(f, ", method {m}")?;
        }
        Ok(())
    }
}

impl RouteTable {
    /// What a node routes by, for `lacewing routes`: each frontend with
    /// its rules (in precedence order), its TrafficPolicy and how requests
    /// are balanced, and their backends' endpoints (`ejected`: those
    /// outlier detection took out, with what to show about each).
    pub fn describe(
        &self,
        ejected: &[(ServiceId, std::net::SocketAddr, String)],
    ) -> serde_json::Value {
        let mut frontends: Vec<_> = self.frontends.iter().collect();
        frontends.sort_by_key(|(addr, _)| **addr);
        let list: Vec<serde_json::Value> = frontends
            .into_iter()
            .map(|(addr, f)| {
                let rules: Vec<serde_json::Value> = f
                    .routes
                    .ordered()
                    .map(|(rule, matched, consumer)| {
                        let backends: Vec<serde_json::Value> = rule
                            .backends
                            .iter()
                            .map(|b| {
                                let port = b.port.unwrap_or(f.port);
                                let service = (b.namespace.clone(), b.name.clone());
                                serde_json::json!({
                                    "service": format!("{}/{}:{port}", b.namespace, b.name),
                                    "weight": b.weight,
                                    "endpoints": self
                                        .endpoints(&service, port)
                                        .iter()
                                        .map(|e| {
                                            match ejected.iter().find(|(s, a, _)| *s == service && *a == e.addr) {
                                                Some((_, _, why)) => format!("{} ({why})", e.addr),
                                                None => e.addr.to_string(),
                                            }
                                        })
                                        .collect::<Vec<_>>(),
                                    "policy": self.policy(&service, port).map(|p| p.policy.clone()),
                                    "balance": self
                                        .policy(&service, port)
                                        .map_or("PeakEwma".to_owned(), |p| p.balance.to_string()),
                                })
                            })
                            .collect();
                        serde_json::json!({
                            "route": rule.route.to_string(),
                            "rule": rule.index,
                            "match": matched.to_string(),
                            "clients": consumer.map_or("all".to_owned(), |ns| format!("namespace {ns}")),
                            "filters": rule.filters.len(),
                            "timeout": rule.timeouts.request.map(|d| format!("{d:?}")),
                            "retries": rule.retry.as_ref().map(|r| r.attempts),
                            "backends": backends,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "frontend": addr.to_string(),
                    "service": format!("{}/{}:{}", f.service.0, f.service.1, f.port),
                    "policy": f.policy.as_ref().map(|p| p.policy.clone()),
                    "rules": rules,
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }
}

/// A route (namespace, name) a rule belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteId {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for RouteId {
    /// `namespace/name`; empty for the rule a Service without routes gets
    /// ([`ServiceRoutes::to_itself`]): no route chose it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name.is_empty() {
            return Ok(());
        }
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a route cannot be accepted, with the Gateway API condition reason a
/// user sees in its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("rules[{rule}]: {what} `{value}` is not a valid regular expression: {why}")]
    Regex {
        rule: usize,
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("rules[{rule}]: {what} `{value}` is not one of {allowed}")]
    Value {
        rule: usize,
        what: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error(
        "rules[{rule}]: {what} `{value}` is not a Gateway API duration such as 500ms, 10s or 1m30s"
    )]
    Duration {
        rule: usize,
        what: &'static str,
        value: String,
    },
    #[error("rules[{rule}]: {what}")]
    Invalid { rule: usize, what: String },
    #[error(
        "rules[{rule}]: filter type `{kind}` is not supported (Lacewing supports RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)"
    )]
    Filter { rule: usize, kind: String },
    #[error("rules[{rule}]: backendRef {name} is a {kind}; only Services can be backends")]
    BackendKind {
        rule: usize,
        name: String,
        kind: String,
    },
}

impl RouteError {
    /// The `Accepted` or `ResolvedRefs` reason Gateway API gives this.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BackendKind { .. } => "InvalidKind",
            _ => "UnsupportedValue",
        }
    }

    /// Whether this is a `ResolvedRefs` problem (else `Accepted`).
    pub fn is_reference(&self) -> bool {
        matches!(self, Self::BackendKind { .. })
    }
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// Whole segments: `/v2` matches `/v2` and `/v2/x`, not `/v2x`. Stored
    /// without a trailing slash (`/` stays `/`).
    Prefix(String),
    /// The whole path.
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(v) => path == v,
            Self::Prefix(v) if v == "/" => true,
            Self::Prefix(v) => path
                .strip_prefix(v.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            Self::Regex(r) => r.is_match(path),
        }
    }

    /// Gateway API's order: Exact, then RegularExpression, then PathPrefix;
    /// a longer value first within each.
    fn rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(v) => (2, v.len()),
            Self::Regex(r) => (1, r.as_str().len()),
            Self::Prefix(v) => (0, v.len()),
        }
    }
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(r) => r.is_match(value),
        }
    }
}

/// One `matches[]` entry: every part must hold.
#[derive(Clone, Debug)]
pub struct Match {
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<http::Method>,
}

impl Match {
    /// Whether a request with this method, path, query and headers matches.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.method.as_ref().is_none_or(|m| m == req.method)
            && self.path.matches(req.path)
            && self.headers.iter().all(|(name, want)| {
                req.headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
            })
            && self.query.iter().all(|(name, want)| {
                // The first occurrence counts (Gateway API).
                query_param(req.query, name).is_some_and(|v| want.matches(&v))
            })
    }
}

/// What a rule is chosen by.
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| v.to_owned())
        })
        .next()
}

/// What a filter does to a request or its response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite {
        hostname: Option<String>,
        path: Option<PathRewrite>,
    },
    Mirror {
        backend: Backend,
        /// numerator / denominator of the requests mirrored.
        fraction: (u32, u32),
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    /// Replaces the part of the path the rule's `PathPrefix` matched.
    Prefix(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
    pub port: Option<u16>,
    pub status: u16,
}

/// A Service a rule sends to (or mirrors to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    /// The Service port; the parent's port when unset.
    pub port: Option<u16>,
    pub weight: u32,
    pub filters: Vec<Filter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// The whole request, retries included; `None` disables.
    pub request: Option<Duration>,
    /// Each try.
    pub backend_request: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: u32,
    pub backoff: Duration,
}

/// Gateway API's default codes when a rule retries without naming any.
pub const DEFAULT_RETRY_CODES: [u16; 4] = [500, 502, 503, 504];
/// Retries when `attempts` is not set.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// The first retry's delay when `backoff` is not set (it doubles after).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// One rule of one route, compiled: one entry per `matches[]` item (its
/// precedence is its match's), sharing the rest.
#[derive(Clone, Debug)]
pub struct Rule {
    pub route: RouteId,
    /// Index in the route's `rules`.
    pub index: usize,
    pub name: Option<String>,
    pub matches: Vec<Match>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

/// Compiles every rule of the route `id`; the first problem is the error.
/// Backends default to the route's namespace.
pub fn compile(id: &RouteId, spec: &HttpRouteSpec) -> Result<Vec<Rule>, RouteError> {
    spec.rules
        .iter()
        .enumerate()
        .map(|(index, rule)| compile_rule(id, index, rule))
        .collect()
}

fn compile_rule(id: &RouteId, index: usize, rule: &HttpRouteRule) -> Result<Rule, RouteError> {
    let regex = |what: &'static str, value: &str| {
        // Anchored: a regular expression matches the whole value.
        Regex::new(&format!("^(?:{value})$")).map_err(|e| RouteError::Regex {
            rule: index,
            what,
            value: value.to_owned(),
            why: e.to_string(),
        })
    };
    let value_match = |what: &'static str, m: &HttpValueMatch| -> Result<ValueMatch, RouteError> {
        match m.type_.as_deref() {
            None | Some("Exact") => Ok(ValueMatch::Exact(m.value.clone())),
            Some("RegularExpression") => Ok(ValueMatch::Regex(regex(what, &m.value)?)),
            Some(other) => Err(RouteError::Value {
                rule: index,
                what,
                value: other.to_owned(),
                allowed: "Exact, RegularExpression",
            }),
        }
    };
    let mut matches = Vec::new();
    let default_match = [Default::default()];
    let listed = if rule.matches.is_empty() {
        &default_match[..]
    } else {
        &rule.matches[..]
    };
    for m in listed {
        let path = path_match(index, m.path.as_ref(), &regex)?;
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let name =
                    HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| RouteError::Invalid {
                        rule: index,
                        what: format!("header name `{}` is not a valid HTTP header name", h.name),
                    })?;
                Ok((name, value_match("header match", h)?))
            })
            .collect::<Result<_, RouteError>>()?;
        let query = m
            .query_params
            .iter()
            .map(|q| Ok((q.name.clone(), value_match("query parameter match", q)?)))
            .collect::<Result<_, RouteError>>()?;
        let method = m
            .method
            .as_deref()
            .map(|v| {
                http::Method::from_bytes(v.as_bytes()).map_err(|_| RouteError::Invalid {
                    rule: index,
                    what: format!("method `{v}` is not an HTTP method"),
                })
            })
            .transpose()?;
        matches.push(Match {
            path,
            headers,
            query,
            method,
        });
    }
    let prefix_matched = listed.iter().all(|m| {
        m.path
            .as_ref()
            .is_none_or(|p| p.type_.as_deref().is_none_or(|t| t == "PathPrefix"))
    });
    let filters = rule
        .filters
        .iter()
        .map(|f| compile_filter(id, index, f, prefix_matched))
        .collect::<Result<Vec<_>, _>>()?;
    let backends = rule
        .backend_refs
        .iter()
        .map(|b| {
            let mut backend = backend(id, index, b)?;
            backend.filters = b
                .filters
                .iter()
                .map(|f| compile_filter(id, index, f, prefix_matched))
                .collect::<Result<_, _>>()?;
            Ok(backend)
        })
        .collect::<Result<Vec<_>, RouteError>>()?;
    let duration =
        |what: &'static str, v: &Option<String>| -> Result<Option<Duration>, RouteError> {
            match v.as_deref() {
                None => Ok(None),
                Some(text) => match crate::duration::gateway(text) {
                    Some(d) if d.is_zero() => Ok(None),
                    Some(d) => Ok(Some(d)),
                    None => Err(RouteError::Duration {
                        rule: index,
                        what,
                        value: text.to_owned(),
                    }),
                },
            }
        };
    let timeouts = match &rule.timeouts {
        None => Timeouts::default(),
        Some(t) => Timeouts {
            request: duration("timeouts.request", &t.request)?,
            backend_request: duration("timeouts.backendRequest", &t.backend_request)?,
        },
    };
    if let (Some(r), Some(b)) = (timeouts.request, timeouts.backend_request)
        && b > r
    {
        return Err(RouteError::Invalid {
            rule: index,
            what: format!(
                "timeouts.backendRequest ({b:?}) must not be longer than timeouts.request ({r:?})"
            ),
        });
    }
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            if let Some(code) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err(RouteError::Invalid {
                    rule: index,
                    what: format!("retry.codes: {code} is not an HTTP error status (400 to 599)"),
                });
            }
            Some(Retry {
                codes: if r.codes.is_empty() {
                    DEFAULT_RETRY_CODES.to_vec()
                } else {
                    r.codes.clone()
                },
                attempts: r.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
                backoff: duration("retry.backoff", &r.backoff)?.unwrap_or(DEFAULT_BACKOFF),
            })
        }
    };
    Ok(Rule {
        route: id.clone(),
        index,
        name: rule.name.clone(),
        matches,
        filters,
        backends,
        timeouts,
        retry,
    })
}

fn path_match(
    rule: usize,
    path: Option<&HttpPathMatch>,
    regex: &impl Fn(&'static str, &str) -> Result<Regex, RouteError>,
) -> Result<PathMatch, RouteError> {
    let value = path
        .and_then(|p| p.value.clone())
        .unwrap_or_else(|| "/".to_owned());
    if !value.starts_with('/') && path.and_then(|p| p.type_.as_deref()) != Some("RegularExpression")
    {
        return Err(RouteError::Invalid {
            rule,
            what: format!("path `{value}` must start with /"),
        });
    }
    match path.and_then(|p| p.type_.as_deref()) {
        None | Some("PathPrefix") => {
            let trimmed = value.trim_end_matches('/');
            Ok(PathMatch::Prefix(if trimmed.is_empty() {
                "/".to_owned()
            } else {
                trimmed.to_owned()
            }))
        }
        Some("Exact") => Ok(PathMatch::Exact(value)),
        Some("RegularExpression") => Ok(PathMatch::Regex(regex("path match", &value)?)),
        Some(other) => Err(RouteError::Value {
            rule,
            what: "path match type",
            value: other.to_owned(),
            allowed: "Exact, PathPrefix, RegularExpression",
        }),
    }
}

fn backend(id: &RouteId, rule: usize, b: &BackendRef) -> Result<Backend, RouteError> {
    if !b.is_service() {
        return Err(RouteError::BackendKind {
            rule,
            name: b.name.clone(),
            kind: b.kind.clone().unwrap_or_default(),
        });
    }
    Ok(Backend {
        namespace: b.namespace.clone().unwrap_or_else(|| id.namespace.clone()),
        name: b.name.clone(),
        port: b.port,
        weight: b.weight.unwrap_or(1),
        filters: Vec::new(),
    })
}

fn compile_filter(
    id: &RouteId,
    rule: usize,
    f: &HttpRouteFilter,
    prefix_matched: bool,
) -> Result<Filter, RouteError> {
    let missing = |field: &str| RouteError::Invalid {
        rule,
        what: format!("filter {} needs its `{field}` field", f.type_),
    };
    let path = |p: &PathModifier| -> Result<PathRewrite, RouteError> {
        match p.type_.as_str() {
            "ReplaceFullPath" => Ok(PathRewrite::Full(
                p.replace_full_path
                    .clone()
                    .ok_or_else(|| missing("replaceFullPath"))?,
            )),
            "ReplacePrefixMatch" if !prefix_matched => Err(RouteError::Invalid {
                rule,
                what: "ReplacePrefixMatch needs every match of the rule to be a PathPrefix"
                    .to_owned(),
            }),
            "ReplacePrefixMatch" => Ok(PathRewrite::Prefix(
                p.replace_prefix_match
                    .clone()
                    .ok_or_else(|| missing("replacePrefixMatch"))?,
            )),
            other => Err(RouteError::Value {
                rule,
                what: "path modifier type",
                value: other.to_owned(),
                allowed: "ReplaceFullPath, ReplacePrefixMatch",
            }),
        }
    };
    let headers = |m: &HeaderModifier| -> Result<HeaderModifier, RouteError> {
        for name in m.set.iter().chain(&m.add).map(|h| &h.name).chain(&m.remove) {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(RouteError::Invalid {
                    rule,
                    what: format!("header name `{name}` is not a valid HTTP header name"),
                });
            }
        }
        for h in m.set.iter().chain(&m.add) {
            if HeaderValue::from_str(&h.value).is_err() {
                return Err(RouteError::Invalid {
                    rule,
                    what: format!("header {} has a value that is not valid in HTTP", h.name),
                });
            }
        }
        Ok(m.clone())
    };
    match f.type_.as_str() {
        "RequestHeaderModifier" => Ok(Filter::RequestHeaders(headers(
            f.request_header_modifier
                .as_ref()
                .ok_or_else(|| missing("requestHeaderModifier"))?,
        )?)),
        "ResponseHeaderModifier" => Ok(Filter::ResponseHeaders(headers(
            f.response_header_modifier
                .as_ref()
                .ok_or_else(|| missing("responseHeaderModifier"))?,
        )?)),
        "RequestRedirect" => {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("requestRedirect"))?;
            let status = r.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(RouteError::Value {
                    rule,
                    what: "redirect statusCode",
                    value: status.to_string(),
                    allowed: "301, 302, 303, 307, 308",
                });
            }
            if let Some(s) = r.scheme.as_deref()
                && s != "http"
                && s != "https"
            {
                return Err(RouteError::Value {
                    rule,
                    what: "redirect scheme",
                    value: s.to_owned(),
                    allowed: "http, https",
                });
            }
            Ok(Filter::Redirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(path).transpose()?,
                port: r.port,
                status,
            }))
        }
        "URLRewrite" => {
            let r = f
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("urlRewrite"))?;
            Ok(Filter::Rewrite {
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(path).transpose()?,
            })
        }
        "RequestMirror" => {
            let m = f
                .request_mirror
                .as_ref()
                .ok_or_else(|| missing("requestMirror"))?;
            let fraction = match (m.percent, &m.fraction) {
                (Some(_), Some(_)) => {
                    return Err(RouteError::Invalid {
                        rule,
                        what: "requestMirror sets both percent and fraction; set one".to_owned(),
                    });
                }
                (Some(p), None) if p <= 100 => (p, 100),
                (None, Some(fr))
                    if fr.denominator.unwrap_or(100) >= fr.numerator
                        && fr.denominator != Some(0) =>
                {
                    (fr.numerator, fr.denominator.unwrap_or(100))
                }
                (None, None) => (100, 100),
                _ => {
                    return Err(RouteError::Invalid {
                        rule,
                        what: "requestMirror mirrors more than all requests (percent 0 to 100, fraction at most 1)".to_owned(),
                    });
                }
            };
            Ok(Filter::Mirror {
                backend: backend(id, rule, &m.backend_ref)?,
                fraction,
            })
        }
        other => Err(RouteError::Filter {
            rule,
            kind: other.to_owned(),
        }),
    }
}

/// One rule's match and where it sits in Gateway API's order.
#[derive(Clone, Debug)]
struct Entry {
    rule: usize,
    matched: usize,
    /// Creation time of its route (seconds), for ties: older first.
    created: i64,
}

/// The compiled rules of every route bound to one Service (one table per
/// Service port a route names, plus routes for all ports), ready to choose
/// from per request.
#[derive(Clone, Debug, Default)]
pub struct ServiceRoutes {
    rules: Vec<Rule>,
    /// The namespace of the consumer routes each rule comes from (`None`:
    /// a producer route), and the port it is bound to (`None`: all).
    binding: Vec<(Option<String>, Option<u16>)>,
    order: Vec<Entry>,
}

impl ServiceRoutes {
    /// Adds a route's rules, bound to `port` (or every port); `consumer`
    /// is its namespace when that is not the Service's. `created` orders
    /// ties (older first).
    pub fn add(
        &mut self,
        rules: Vec<Rule>,
        port: Option<u16>,
        consumer: Option<String>,
        created: i64,
    ) {
        for rule in rules {
            let index = self.rules.len();
            for matched in 0..rule.matches.len() {
                self.order.push(Entry {
                    rule: index,
                    matched,
                    created,
                });
            }
            self.rules.push(rule);
            self.binding.push((consumer.clone(), port));
        }
        let rules = &self.rules;
        self.order.sort_by(|a, b| precedence(rules, a, b));
    }

    /// One rule, for every request to `port` from every client: to the
    /// Service itself (a Service with a per-request TrafficPolicy and no
    /// route).
    pub fn to_itself(service: &ServiceId, port: u16) -> Self {
        let mut routes = Self::default();
        routes.add(
            vec![Rule {
                route: RouteId {
                    namespace: service.0.clone(),
                    name: String::new(),
                },
                index: 0,
                name: None,
                matches: vec![Match {
                    path: PathMatch::Prefix("/".to_owned()),
                    headers: Vec::new(),
                    query: Vec::new(),
                    method: None,
                }],
                filters: Vec::new(),
                backends: vec![Backend {
                    namespace: service.0.clone(),
                    name: service.1.clone(),
                    port: Some(port),
                    weight: 1,
                    filters: Vec::new(),
                }],
                timeouts: Timeouts::default(),
                retry: None,
            }],
            Some(port),
            None,
            0,
        );
        routes
    }

    /// Whether any route binds `port` (for some clients).
    pub fn binds_port(&self, port: u16) -> bool {
        self.binding
            .iter()
            .any(|(_, p)| p.is_none_or(|p| p == port))
    }

    /// Whether any route applies to clients of `namespace` dialling `port`:
    /// if not, the connection stays at L4.
    pub fn applies(&self, port: u16, namespace: &str) -> bool {
        let consumer = self.has_consumer(port, namespace);
        (0..self.rules.len()).any(|i| self.bound(i, port, namespace, consumer))
    }

    /// The rule (and its match) for a request from a client in `namespace`
    /// that dialled `port`; `None` is a 404.
    pub fn select(
        &self,
        port: u16,
        namespace: &str,
        req: &RequestView<'_>,
    ) -> Option<(&Rule, &Match)> {
        let consumer = self.has_consumer(port, namespace);
        self.order
            .iter()
            .filter(|e| self.bound(e.rule, port, namespace, consumer))
            .map(|e| (&self.rules[e.rule], &self.rules[e.rule].matches[e.matched]))
            .find(|(_, m)| m.matches(req))
    }

    /// Every rule's match in precedence order, with the namespace of the
    /// consumer route it comes from (`None`: a producer route).
    pub fn ordered(&self) -> impl Iterator<Item = (&Rule, &Match, Option<&str>)> {
        self.order.iter().map(|e| {
            let rule = &self.rules[e.rule];
            (
                rule,
                &rule.matches[e.matched],
                self.binding[e.rule].0.as_deref(),
            )
        })
    }

    fn has_consumer(&self, port: u16, namespace: &str) -> bool {
        self.binding
            .iter()
            .any(|(c, p)| c.as_deref() == Some(namespace) && p.is_none_or(|p| p == port))
    }

    fn bound(&self, rule: usize, port: u16, namespace: &str, consumer: bool) -> bool {
        let (c, p) = &self.binding[rule];
        p.is_none_or(|p| p == port)
            && match c {
                // A consumer route of the client's namespace replaces the
                // producer routes for it.
                None => !consumer,
                Some(ns) => ns == namespace,
            }
    }
}

fn precedence(rules: &[Rule], a: &Entry, b: &Entry) -> Ordering {
    let (ra, rb) = (&rules[a.rule], &rules[b.rule]);
    let (ma, mb) = (&ra.matches[a.matched], &rb.matches[b.matched]);
    // Higher ranks first: compare b to a.
    mb.path
        .rank()
        .cmp(&ma.path.rank())
        .then(mb.method.is_some().cmp(&ma.method.is_some()))
        .then(mb.headers.len().cmp(&ma.headers.len()))
        .then(mb.query.len().cmp(&ma.query.len()))
        .then(a.created.cmp(&b.created))
        .then(ra.route.cmp(&rb.route))
        .then(ra.index.cmp(&rb.index))
        .then(a.matched.cmp(&b.matched))
}

/// Applies a header modifier: set replaces, add appends, remove deletes
/// (Gateway API's order).
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for h in &m.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.insert(name, value);
        }
    }
    for h in &m.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) {
            headers.append(name, value);
        }
    }
    for name in &m.remove {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
}

/// The path after a rewrite; `matched` is the rule's match (its prefix is
/// what `ReplacePrefixMatch` replaces).
pub fn rewrite_path(path: &str, rewrite: &PathRewrite, matched: &Match) -> String {
    match (rewrite, &matched.path) {
        (PathRewrite::Full(p), _) => p.clone(),
        (PathRewrite::Prefix(with), PathMatch::Prefix(prefix)) => {
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix.as_str()).unwrap_or(path)
            };
            let with = with.trim_end_matches('/');
            let joined = if with.is_empty() {
                if rest.is_empty() {
                    "/".to_owned()
                } else {
                    rest.to_owned()
                }
            } else if rest.is_empty() || rest.starts_with('/') {
                format!("{with}{rest}")
            } else {
                format!("{with}/{rest}")
            };
            if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
        (PathRewrite::Prefix(_), _) => path.to_owned(),
    }
}

/// The `Location` of a redirect of a request for `scheme://host[:port]path?query`.
pub fn redirect_location(
    r: &Redirect,
    matched: &Match,
    scheme: &str,
    host: &str,
    port: Option<u16>,
    path: &str,
    query: Option<&str>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r.hostname.as_deref().unwrap_or(host);
    // An explicit port wins; a scheme change with none takes the scheme's
    // well-known port; otherwise the request's port stays.
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => port,
    };
    let port = port.filter(|p| !matches!((scheme, *p), ("http", 80) | ("https", 443)));
    let path = r
        .path
        .as_ref()
        .map_or_else(|| path.to_owned(), |p| rewrite_path(path, p, matched));
    let mut location = format!("{scheme}://{host}");
    if let Some(p) = port {
        location.push_str(&format!(":{p}"));
    }
    location.push_str(&path);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        location.push('?');
        location.push_str(q);
    }
    location
}

#[cfg(test)]
mod tests;
