//! `GET /explain` on the admin endpoint: this node's part of what a
//! connection from a source pod to a destination would meet, read from the
//! state the daemon acts on (the kernel's service maps and fast-path
//! verdicts, the routes, endpoints' ejections, the policies), never from a
//! second model of it.
//!
//! The node of the source answers the source side (the kernel's balancing
//! or capture, the route and rule, the path: same node, fast path, tunnel
//! or plain) and names the pod the connection would reach (`hand_off`);
//! the node of that pod answers the destination side (mTLS mode, the
//! AuthorizationPolicies and their verdict for the source's identity and
//! the request). `lacewing explain` asks both and prints the walk.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use lacewing_core::model::{
    authorization::{self, Source},
    routes::RequestView,
    workloads::Workload,
};
use lacewing_sys::http::{query_param, query_params};
use serde::Serialize;

use crate::{fastpath::IdentityNumbers, lb::LoadBalancer, workloads::LocalWorkloads};

/// The state an answer is read from: the node's own, as it acts on it.
pub struct View<'a> {
    pub node: &'a str,
    pub trust_domain: &'a str,
    pub workloads: &'a LocalWorkloads,
    pub lb: &'a std::sync::Mutex<LoadBalancer>,
    pub outliers: &'a lacewing_proxy::router::resilience::Outliers,
    pub breakers: &'a lacewing_proxy::router::resilience::Breakers,
    /// The fast path's identity numbers and the maps' bpffs root, when the
    /// node captures.
    pub fast_path: Option<(&'a IdentityNumbers, &'a std::path::Path)>,
}

/// What is asked.
#[derive(Debug)]
pub struct Query {
    /// A pod IP, or `namespace/name` of a pod on this node.
    pub source: String,
    /// `IP:port` (a ClusterIP's or a pod's), or `namespace/name:port` of a
    /// Service.
    pub destination: String,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
}

/// A query that cannot be answered as given.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "missing `{0}`: GET /explain?source=<pod IP or ns/name>&destination=<IP:port or ns/name:port>[&method=GET&path=/&header=name:value]"
    )]
    Missing(&'static str),
    #[error("`{0}` is not an HTTP method")]
    Method(String),
    #[error("header `{0}`: give it as name:value")]
    Header(String),
}

impl Query {
    pub fn from_request(req: &Request<()>) -> Result<Self, QueryError> {
        let source = query_param(req, "source").ok_or(QueryError::Missing("source"))?;
        let destination =
            query_param(req, "destination").ok_or(QueryError::Missing("destination"))?;
        let method = match query_param(req, "method") {
            None => Method::GET,
            Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| QueryError::Method(m))?,
        };
        let path = query_param(req, "path").unwrap_or_else(|| "/".to_owned());
        let mut headers = HeaderMap::new();
        for h in query_params(req, "header") {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| QueryError::Header(h.clone()))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| QueryError::Header(h.clone()))?;
            let value =
                HeaderValue::from_str(value.trim()).map_err(|_| QueryError::Header(h.clone()))?;
            headers.append(name, value);
        }
        Ok(Self {
            source,
            destination,
            method,
            path,
            headers,
        })
    }
}

/// One check on the way, in order.
#[derive(Debug, Serialize)]
pub struct Step {
    /// `kernel`, `daemon` (the source's node) or `destination`.
    pub layer: &'static str,
    pub check: String,
    /// `pass`, `refuse`, `deny`, or `info`.
    pub result: &'static str,
    pub detail: String,
}

/// This node's answer.
#[derive(Debug, Default, Serialize)]
pub struct Explained {
    pub node: String,
    /// The source is a pod on this node: the source side is answered.
    pub source_here: bool,
    /// The destination is a pod on this node: its side is answered.
    pub destination_here: bool,
    /// The source's address and identity, when known.
    pub source_address: Option<IpAddr>,
    pub source_identity: Option<String>,
    pub steps: Vec<Step>,
    /// The pod the connection reaches (and its node, when known), for its
    /// node to answer the destination side.
    pub hand_off: Option<HandOff>,
    /// `allowed`, `refused` or `denied` once decided; `continue` when the
    /// destination's node decides.
    pub verdict: &'static str,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct HandOff {
    pub address: SocketAddr,
    pub node: Option<String>,
}

impl Explained {
    fn step(
        &mut self,
        layer: &'static str,
        check: impl Into<String>,
        result: &'static str,
        detail: impl Into<String>,
    ) {
        self.steps.push(Step {
            layer,
            check: check.into(),
            result,
            detail: detail.into(),
        });
    }

    fn decide(&mut self, verdict: &'static str, reason: impl Into<String>) {
        self.verdict = verdict;
        self.reason = reason.into();
    }
}

pub fn explain(view: &View<'_>, q: &Query) -> Explained {
    let mut out = Explained {
        node: view.node.to_owned(),
        verdict: "continue",
        ..Explained::default()
    };
    let workloads = view.workloads;
    let source_local: Option<Arc<Workload>> = match q.source.parse::<IpAddr>() {
        Ok(ip) => workloads.local(ip),
        Err(_) => workloads.by_key(&q.source),
    };
    let source_ip = q.source.parse::<IpAddr>().ok().or_else(|| {
        source_local
            .as_ref()
            .and_then(|w| w.addresses.first().copied())
    });
    out.source_address = source_ip;
    // The source's identity: a meshed pod here, or a meshed peer anywhere.
    let source_meshed = source_local.as_ref().map_or_else(
        || source_ip.and_then(|ip| workloads.peer(ip)).is_some(),
        |w| w.meshed,
    );
    out.source_identity = match (&source_local, source_ip.and_then(|ip| workloads.peer(ip))) {
        (Some(w), _) if w.meshed => Some(w.identity(view.trust_domain)),
        (_, Some(p)) => Some(p.identity(view.trust_domain)),
        _ => None,
    };
    out.source_here = source_local.is_some();
    let Some(destination) = resolve_destination(view, &q.destination) else {
        out.step(
            "daemon",
            "destination",
            "refuse",
            format!(
                "`{}` is neither IP:port nor a Service this node knows (namespace/name:port)",
                q.destination
            ),
        );
        out.decide("refused", format!("unknown destination {}", q.destination));
        return out;
    };
    if let Some(source) = &source_local {
        source_side(view, q, source, destination, &mut out);
    }
    if out.verdict == "continue" {
        let pod = out.hand_off.as_ref().map_or(destination, |h| h.address);
        if let Some(dest) = workloads.local(pod.ip()) {
            out.destination_here = true;
            destination_side(
                view,
                q,
                &dest,
                pod,
                source_meshed,
                out.source_identity.clone(),
                &mut out,
            );
        }
    }
    out
}

/// `IP:port`, or a Service's `namespace/name:port` (the port's number or
/// name) from the kernel's services.
fn resolve_destination(view: &View<'_>, text: &str) -> Option<SocketAddr> {
    if let Ok(addr) = text.parse() {
        return Some(addr);
    }
    let (service, port) = text.rsplit_once(':')?;
    view.lb.lock().ok()?.frontend_of(service, port)
}

fn source_side(
    view: &View<'_>,
    q: &Query,
    source: &Workload,
    destination: SocketAddr,
    out: &mut Explained,
) {
    let workloads = view.workloads;
    out.step(
        "kernel",
        "source pod",
        "info",
        if source.meshed {
            format!(
                "{} is meshed: the connect hook captures its TCP to this node's daemon",
                source.key()
            )
        } else {
            format!(
                "{} is not meshed: its connections leave in plain text, balanced by the kernel",
                source.key()
            )
        },
    );
    let service = view
        .lb
        .lock()
        .ok()
        .and_then(|lb| lb.service_at(destination).ok().flatten());
    let table = workloads.routes();
    let mut pod = destination;
    if let Some(svc) = service {
        let name = &svc.name;
        if svc.backends.is_empty() {
            out.step("kernel", format!("LW_SERVICES {destination} ({name})"), "refuse", "no ready backend in LW_BACKENDS: the kernel refuses the connect (ECONNREFUSED), as kube-proxy does");
            out.decide("refused", format!("Service {name} has no ready backend"));
            return;
        }
        let routed = table
            .frontend(destination)
            .filter(|f| source.meshed && f.routes.applies(f.port, &source.namespace));
        if let Some(frontend) = routed {
            out.step("kernel", format!("LW_SERVICES {destination} ({name})"), "pass", format!("a routed Service: captured unbalanced, with {destination} as the original destination, for the daemon to route each request"));
            let request = RequestView {
                method: &q.method,
                path: &q.path,
                query: None,
                headers: &q.headers,
            };
            let Some((rule, _)) =
                frontend
                    .routes
                    .select(frontend.port, &source.namespace, &request)
            else {
                out.step(
                    "daemon",
                    format!("route for {} {}", q.method, q.path),
                    "refuse",
                    "no rule matches: answered 404 by the source's daemon",
                );
                out.decide(
                    "refused",
                    format!(
                        "no HTTPRoute rule of {name} matches {} {}",
                        q.method, q.path
                    ),
                );
                return;
            };
            let route = rule.route.to_string();
            out.step(
                "daemon",
                format!("route for {} {}", q.method, q.path),
                "pass",
                if route.is_empty() {
                    "no HTTPRoute: the Service's own endpoints (its TrafficPolicy makes it routed)"
                        .to_owned()
                } else {
                    format!("HTTPRoute {route} rule {}", rule.index)
                },
            );
            if let Some(policy) = &frontend.policy {
                out.step("daemon", "TrafficPolicy", "info", format!("{} applies (timeout {}, retries {}, circuit breaker {}, outlier detection {})",
                    policy.policy,
                    policy.timeout.map_or_else(|| "none".to_owned(), |t| format!("{t:?}")),
                    policy.retry.as_ref().map_or(0, |r| r.attempts),
                    if policy.breaker.is_some() { "on" } else { "off" },
                    if policy.outlier.is_some() { "on" } else { "off" }));
            }
            let ejected = crate::ejected(view.outliers);
            let mut healthy = Vec::new();
            // The balancing of the first backend Service (its own
            // TrafficPolicy's, else peak EWMA).
            let mut balance = None;
            let mut open_circuits = Vec::new();
            for backend in &rule.backends {
                let id = (backend.namespace.clone(), backend.name.clone());
                let port = backend.port.unwrap_or(frontend.port);
                let endpoints = table.endpoints(&id, port);
                balance.get_or_insert_with(|| {
                    table
                        .policy(&id, port)
                        .map_or_else(|| "PeakEwma".to_owned(), |p| p.balance.to_string())
                });
                let mut shown = Vec::new();
                for e in endpoints {
                    match ejected.iter().find(|(s, a, _)| *s == id && *a == e.addr) {
                        Some((_, _, why)) => shown.push(format!("{} ({why})", e.addr)),
                        None => {
                            healthy.push(e.addr);
                            shown.push(format!("{} (healthy)", e.addr));
                        }
                    }
                }
                out.step(
                    "daemon",
                    format!("backend {}/{}:{port} weight {}", id.0, id.1, backend.weight),
                    if endpoints.is_empty() {
                        "refuse"
                    } else {
                        "info"
                    },
                    if endpoints.is_empty() {
                        "no ready endpoint".to_owned()
                    } else {
                        shown.join(", ")
                    },
                );
                if let Some(p) = table.policy(&id, port)
                    && p.outlier.is_some()
                    && endpoints
                        .iter()
                        .any(|e| ejected.iter().any(|(s, a, _)| *s == id && *a == e.addr))
                {
                    out.step("daemon", "outlier detection", "info", format!("TrafficPolicy {} ejected {} endpoint(s) of {}/{}: requests go to the others", p.policy, endpoints.iter().filter(|e| ejected.iter().any(|(s, a, _)| *s == id && *a == e.addr)).count(), id.0, id.1));
                }
                // The circuit as the router counts it now.
                if let Some(p) = table.policy(&id, port)
                    && let Some(limits) = p.breaker
                {
                    let (in_flight, waiting) = view.breakers.load(&id).unwrap_or((0, 0));
                    let open = limits.max_requests.is_some_and(|max| in_flight >= max);
                    if open {
                        open_circuits
                            .push(format!("{}/{} (TrafficPolicy {})", id.0, id.1, p.policy));
                    }
                    out.step(
                        "daemon",
                        format!("circuit breaker of {}/{}", id.0, id.1),
                        if open { "refuse" } else { "info" },
                        format!(
                            "{in_flight} request(s) in flight (maxRequests {}), {waiting} waiting for a connection (maxPendingRequests {}){}",
                            limits.max_requests.map_or_else(|| "none".to_owned(), |m| m.to_string()),
                            limits.max_pending.map_or_else(|| "none".to_owned(), |m| m.to_string()),
                            if open { ": open, a new request is answered 503 at once" } else { "" }
                        ),
                    );
                }
            }
            if !open_circuits.is_empty() && open_circuits.len() == rule.backends.len() {
                out.decide(
                    "refused",
                    format!(
                        "circuit open: {} (503 until a request in flight ends)",
                        open_circuits.join(", ")
                    ),
                );
                return;
            }
            let Some(first) = healthy.first() else {
                out.decide("refused", format!("no endpoint of route {route} can take it (none ready, or every one ejected): 503"));
                return;
            };
            out.step(
                "daemon",
                "balancing",
                "info",
                format!(
                    "each request to one of {} endpoint(s) ({}), e.g. {first}",
                    healthy.len(),
                    balance.unwrap_or_default()
                ),
            );
            pod = *first;
        } else {
            let how = if svc.affinity_timeout_s > 0 {
                format!(
                    "{} with ClientIP affinity for {} s",
                    svc.algorithm, svc.affinity_timeout_s
                )
            } else {
                svc.algorithm.clone()
            };
            out.step(
                "kernel",
                format!("LW_SERVICES {destination} ({name})"),
                "pass",
                format!(
                    "balanced at connect() ({how}) among {} backend(s) in LW_BACKENDS: {}",
                    svc.backends.len(),
                    svc.backends.join(", ")
                ),
            );
            let first = svc
                .backends
                .first()
                .and_then(|b| b.split('*').next()?.parse().ok());
            if let Some(first) = first {
                pod = first;
            }
        }
    } else {
        out.step(
            "kernel",
            "LW_SERVICES",
            "info",
            format!("{destination} is no Service: connected as dialled"),
        );
    }
    // Where the connection to `pod` goes from here.
    let dest_local = workloads.local(pod.ip());
    let dest_peer = workloads.peer(pod.ip());
    out.hand_off = Some(HandOff {
        address: pod,
        node: match (&dest_local, &dest_peer) {
            (Some(_), _) => Some(view.node.to_owned()),
            (None, Some(p)) => Some(p.node.clone()),
            _ => None,
        },
    });
    if !source.meshed {
        out.step(
            "kernel",
            "path",
            "info",
            format!("plain text from the pod to {pod}"),
        );
        return;
    }
    match (&dest_local, &dest_peer) {
        (Some(d), _) if d.meshed => {
            let fast = view.fast_path.as_ref().and_then(|(numbers, root)| {
                let id = source.identity(view.trust_domain);
                crate::fastpath::FastPathMaps::open(root)
                    .ok()?
                    .verdict(pod.ip(), numbers.number(&id))
            });
            match fast {
                Some(true) => {
                    out.step("kernel", "LW_PAIR_POLICY", "pass", format!("the same-node fast path: {} may reach {} on every port, so the kernel connects them directly (no daemon hop)", source.key(), d.key()));
                    out.decide(
                        "allowed",
                        format!(
                            "same-node fast path to {} (L4 policy allows it on every port)",
                            d.key()
                        ),
                    );
                }
                Some(false) => {
                    out.step("kernel", "LW_PAIR_POLICY", "deny", format!("L4 policy denies {} to {} on every port: the kernel refuses the connect", source.key(), d.key()));
                    out.decide(
                        "denied",
                        format!(
                            "by L4 policy, in the kernel's fast path ({} to {})",
                            source.key(),
                            d.key()
                        ),
                    );
                }
                None => {
                    out.step("daemon", "path", "info", format!("same node: through the daemon's inbound checks to {} (no fast-path verdict: the policy depends on the port or the request)", d.key()));
                }
            }
        }
        (_, Some(p)) => {
            out.step(
                "daemon",
                "path",
                "info",
                format!(
                    "through the tunnel (HBONE, mutual TLS 1.3) to node {} for {pod}",
                    p.node
                ),
            );
        }
        _ => {
            out.step(
                "daemon",
                "path",
                "info",
                format!("{pod} is not meshed: carried in plain text from the pod's namespace"),
            );
            if out.verdict == "continue" && dest_local.is_none() {
                out.decide("allowed", format!("to {pod}, outside the mesh"));
            }
        }
    }
}

fn destination_side(
    view: &View<'_>,
    q: &Query,
    dest: &Workload,
    pod: SocketAddr,
    source_meshed: bool,
    identity: Option<String>,
    out: &mut Explained,
) {
    if !dest.meshed {
        out.step(
            "destination",
            format!("pod {}", dest.key()),
            "pass",
            "not meshed: no policy of the mesh applies",
        );
        out.decide("allowed", format!("{} is outside the mesh", dest.key()));
        return;
    }
    let mode = if dest.strict { "STRICT" } else { "PERMISSIVE" };
    let Some(identity) = identity.filter(|_| source_meshed) else {
        if dest.strict {
            out.step(
                "destination",
                format!("pod {} ({mode})", dest.key()),
                "refuse",
                "plain text from a source that is not meshed is refused by the kernel (STRICT)",
            );
            out.decide(
                "refused",
                format!("{} is STRICT and the source is not meshed", dest.key()),
            );
        } else {
            out.step(
                "destination",
                format!("pod {} ({mode})", dest.key()),
                "pass",
                "plain text accepted (PERMISSIVE): no identity to authorize",
            );
            out.decide(
                "allowed",
                format!("{} is PERMISSIVE: plain text accepted", dest.key()),
            );
        }
        return;
    };
    out.step(
        "destination",
        format!("pod {} ({mode})", dest.key()),
        "pass",
        format!("the peer proves {identity} with its certificate"),
    );
    let policies = view.workloads.policies();
    let selecting: Vec<String> = policies
        .iter()
        .filter(|p| p.selects(dest))
        .map(|p| p.key())
        .collect();
    let l7 = authorization::needs_requests(&policies, dest);
    let request = authorization::Request {
        method: q.method.as_str(),
        path: &q.path,
        headers: &q.headers,
    };
    out.step(
        "destination",
        "AuthorizationPolicies",
        "info",
        if selecting.is_empty() {
            "none selects the pod: allowed".to_owned()
        } else {
            format!(
                "{} select the pod{}",
                selecting.join(", "),
                if l7 {
                    " (with L7 rules: each request is decided)"
                } else {
                    ""
                }
            )
        },
    );
    let decided = authorization::decide(
        &policies,
        dest,
        pod.port(),
        &Source {
            identity: &identity,
        },
        l7.then_some(&request),
    );
    let what = if l7 {
        format!("{} {} ", q.method, q.path)
    } else {
        String::new()
    };
    match decided {
        Ok(()) => {
            out.step(
                "destination",
                format!("{what}from {identity}"),
                "pass",
                "allowed",
            );
            if let Some(limited) = view.workloads.routes().limited(pod) {
                out.step(
                    "destination",
                    "rate limit",
                    "info",
                    format!("TrafficPolicy {} limits it", limited.policy.policy),
                );
            }
            out.decide(
                "allowed",
                format!("{what}from {identity} to {} is allowed", dest.key()),
            );
        }
        Err(denied) => {
            out.step(
                "destination",
                format!("{what}from {identity}"),
                "deny",
                format!("{}: {}", denied.policy, denied.reason),
            );
            out.decide(
                "denied",
                format!(
                    "by AuthorizationPolicy {}: {}",
                    denied.policy, denied.reason
                ),
            );
        }
    }
}
