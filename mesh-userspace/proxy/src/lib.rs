//! The node daemon's per-connection services, apart from how the node gets
//! its sockets and state:
//!
//! - [`inbound::Inbound`]: a stream for a pod here (through the tunnel, or
//!   from a meshed pod on this node) is checked (the source's proven
//!   identity, the AuthorizationPolicies selecting the pod), connected and
//!   carried;
//! - [`outbound::Outbound`]: a captured connection goes through the tunnel,
//!   to a pod on this node through [`inbound::Inbound`], or unchanged;
//! - [`l7`]: HTTP requests to a pod that an L7 AuthorizationPolicy or a
//!   rate limit covers, decided one by one;
//! - [`ratelimit`]: TrafficPolicies' rate limits at the destination, per
//!   request or per connection;
//! - [`router`]: HTTP requests to a Service that HTTPRoutes or a
//!   TrafficPolicy bind, routed one by one at the source (rules, filters,
//!   weights, per-request balancing, timeouts, retries with a budget,
//!   mirrors, circuit breaking, outlier detection, fault injection);
//! - [`registry::Registry`]: every live connection, so a policy change
//!   closes what it now denies and a drain waits for what is open;
//! - [`splice`]: copying both ways, watching spliced writers.
//!
//! What the proxy needs from the node comes through two seams:
//! [`state::StateView`] (a read-only, indexed view of workloads, peers,
//! policies and certificates, with change notification) and
//! [`sockets::SocketFactory`] (network namespaces, marks, splice watches).
//! [`Proxy::new`] composes the services in one place; the L7 layers will be
//! pushed here.
#![forbid(unsafe_code)]

pub mod answer;
#[cfg(test)]
mod fixtures;
pub mod inbound;
pub mod l7;
pub mod metrics;
pub mod outbound;
pub mod ratelimit;
pub mod registry;
pub mod router;
pub mod sockets;
pub mod splice;
pub mod state;
pub mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

use std::{sync::Arc, time::Duration};

use lacewing_tunnel::{client::Pool, metrics::TunnelMetrics};

use crate::{
    inbound::Inbound, outbound::Outbound, registry::Registry, sockets::SocketFactory,
    state::StateView,
};

/// What the proxy is built from.
pub struct ProxyConfig {
    pub trust_domain: String,
    /// The mesh's trust bundle: tunnel peers must chain to it. Replaced
    /// when a CA rotation changes the bundle.
    pub roots: lacewing_tunnel::tls::Roots,
    /// `SO_MARK` of the tunnel's own sockets (never captured).
    pub tunnel_mark: Option<u32>,
    /// How long a new pod's first connection waits for its certificate.
    pub certificate_wait: Duration,
    /// The router's outlier detection state (shared with what shows the
    /// ejected endpoints).
    pub outliers: Arc<router::resilience::Outliers>,
    /// The router's circuit breakers (shared likewise).
    pub breakers: Arc<router::resilience::Breakers>,
    /// Access logs and traces, each off unless configured.
    pub telemetry: telemetry::Telemetry,
}

/// The composed services, sharing one registry.
pub struct Proxy {
    pub inbound: Arc<Inbound>,
    pub outbound: Arc<Outbound>,
    pub registry: Arc<Registry>,
    pub metrics: TunnelMetrics,
}

impl Proxy {
    /// The services over `state` and `sockets`, registering their
    /// connections in `registry` (which the node's metrics read).
    pub fn new(
        config: ProxyConfig,
        state: Arc<dyn StateView>,
        sockets: Arc<dyn SocketFactory>,
        registry: Arc<Registry>,
        metrics: TunnelMetrics,
        requests: metrics::RequestMetrics,
    ) -> Self {
        let inbound = Arc::new(Inbound {
            state: Arc::clone(&state),
            sockets: Arc::clone(&sockets),
            registry: Arc::clone(&registry),
            trust_domain: config.trust_domain.clone(),
            metrics: metrics.clone(),
            requests: requests.clone(),
            limits: ratelimit::RateLimits::default(),
            telemetry: config.telemetry.clone(),
        });
        let outbound = Arc::new(Outbound {
            state,
            sockets,
            inbound: Arc::clone(&inbound),
            registry: Arc::clone(&registry),
            pool: Pool::new(config.tunnel_mark).counted(metrics.clone()),
            roots: config.roots,
            telemetry: config.telemetry.clone(),
            router: Arc::new(router::Router::new(
                requests,
                config.outliers,
                config.breakers,
                config.telemetry,
                config.trust_domain.clone(),
            )),
            trust_domain: config.trust_domain,
            metrics: metrics.clone(),
            certificate_wait: config.certificate_wait,
        });
        Self {
            inbound,
            outbound,
            registry,
            metrics,
        }
    }

    /// Decides every established inbound connection again whenever the
    /// configuration changes, and closes (resets) those now denied, logged
    /// with their reason and counted as a new connection's denial is.
    /// Runs until the state's sender goes away.
    pub async fn recheck_on_change(&self) {
        let mut changes = self.inbound.state.config_changes();
        while changes.changed().await.is_ok() {
            let closed = self.registry.recheck(|peer, dest| {
                self.inbound
                    .authorize(peer, dest)
                    .map(|workload| self.inbound.per_request(&workload, dest))
            });
            for c in closed {
                tracing::info!(
                    identity = %c.peer.identity,
                    source = ?c.peer.source,
                    dest = %c.dest,
                    reason = c.refusal.reason,
                    detail = %c.refusal.detail,
                    policy = ?c.refusal.policy,
                    "established connection closed: the policy now denies it"
                );
                self.metrics.refused(&c.refusal);
            }
        }
    }
}
