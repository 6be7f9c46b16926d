//! Tunnel metrics, on the node's :15020 `/metrics`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound` (this node opened it) or `inbound`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    /// `to_destination` or `to_source`.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Default)]
pub struct TunnelMetrics {
    /// Connections (mutual TLS, then HTTP/2) made or accepted: a stream
    /// that finds one pooled opens none.
    pub connections: Family<DirectionLabels, Counter>,
    pub opened: Family<DirectionLabels, Counter>,
    pub closed: Family<DirectionLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub policy_denials: Family<PolicyLabels, Counter>,
}

impl TunnelMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "lacewing_tunnel_connections_opened",
            "Tunnel connections (mutual TLS and HTTP/2, carrying streams) established with other nodes, by direction",
            m.connections.clone(),
        );
        registry.register(
            "lacewing_tunnel_streams_opened",
            "Tunnel streams (one proxied connection each) opened, by direction",
            m.opened.clone(),
        );
        registry.register(
            "lacewing_tunnel_streams_closed",
            "Tunnel streams closed, by direction",
            m.closed.clone(),
        );
        registry.register(
            "lacewing_tunnel_bytes",
            "Bytes carried by tunnel streams, by direction and flow",
            m.bytes.clone(),
        );
        registry.register(
            "lacewing_tunnel_handshake_failures",
            "TLS handshakes on :15008 that failed, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "lacewing_tunnel_refused",
            "Tunnel streams refused before reaching the destination, by reason",
            m.refused.clone(),
        );
        registry.register(
            "lacewing_policy_denials",
            "Connections an AuthorizationPolicy denied, by policy",
            m.policy_denials.clone(),
        );
        m
    }

    pub fn connection_opened(&self, direction: &'static str) {
        self.connections
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn opened(&self, direction: &'static str) {
        self.opened
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn closed(&self, direction: &'static str, to_destination: u64, to_source: u64) {
        self.closed
            .get_or_create(&DirectionLabels { direction })
            .inc();
        for (flow, n) in [("to_destination", to_destination), ("to_source", to_source)] {
            self.bytes
                .get_or_create(&BytesLabels { direction, flow })
                .inc_by(n);
        }
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn refused(&self, refusal: &super::Refusal) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: refusal.reason.to_owned(),
            })
            .inc();
        if let Some(policy) = &refusal.policy {
            self.policy_denials
                .get_or_create(&PolicyLabels {
                    policy: policy.clone(),
                })
                .inc();
        }
    }
}
