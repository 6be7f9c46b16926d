//! Fixtures for the proxy's unit tests: workloads, peers and policies as
//! the controller would send them, and a proxy over plain sockets.

use std::{net::IpAddr, sync::Arc, time::Duration};

use lacewing_core::{
    api::authorization::AuthorizationPolicySpec,
    model::{
        authorization::Policy,
        workloads::{PeerEntry, Workload},
    },
};
use lacewing_tunnel::metrics::TunnelMetrics;

use crate::{
    Proxy, ProxyConfig,
    testing::{Fixed, Plain},
};

pub const TD: &str = "cluster.local";
pub const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
pub const OTHER: &str = "spiffe://cluster.local/ns/other/sa/x";

pub fn workload(name: &str, service_account: &str, address: &str, meshed: bool) -> Workload {
    Workload {
        namespace: "shop".into(),
        name: name.into(),
        uid: String::new(),
        node: "n1".into(),
        service_account: service_account.into(),
        addresses: vec![address.parse().unwrap()],
        meshed,
        strict: false,
        access_log: false,
        labels: [("app".to_owned(), name.to_owned())].into(),
    }
}

pub fn peer(
    address: &str,
    namespace: &str,
    service_account: &str,
    node: &str,
) -> (IpAddr, PeerEntry) {
    (
        address.parse().unwrap(),
        PeerEntry {
            namespace: namespace.into(),
            service_account: service_account.into(),
            node: node.into(),
            node_address: "192.168.0.2".parse().unwrap(),
        },
    )
}

/// An AuthorizationPolicy `shop/<name>` from its spec in YAML.
pub fn policy(name: &str, spec: &str) -> Policy {
    Policy {
        namespace: "shop".into(),
        name: name.into(),
        spec: serde_yaml::from_str::<AuthorizationPolicySpec>(spec).unwrap(),
    }
}

/// A proxy over plain sockets and `state`.
pub fn proxy(state: Arc<Fixed>, certificate_wait: Duration) -> Proxy {
    Proxy::new(
        ProxyConfig {
            trust_domain: TD.into(),
            roots: lacewing_tunnel::tls::Roots::new(Arc::new(rustls::RootCertStore::empty())),
            tunnel_mark: None,
            certificate_wait,
            outliers: Arc::default(),
            breakers: Arc::default(),
            telemetry: crate::telemetry::Telemetry::default(),
        },
        state,
        Arc::new(Plain),
        Arc::default(),
        TunnelMetrics::default(),
        crate::metrics::RequestMetrics::default(),
    )
}
