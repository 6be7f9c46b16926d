//! What nodes are sent: the services of the cluster (every node needs all of
//! them) and each node's own workloads, at one version; and the delta between
//! two versions.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use tokio::sync::watch;

use lacewing_core::model::{
    Declared,
    authorization::Policy,
    routes::AcceptedRoute,
    services::ServiceEntry,
    traffic::AcceptedTraffic,
    workloads::{PeerEntry, Workload, by_node, peers},
};
use lacewing_core::proto::{self, pb};

pub use lacewing_core::model::services::FrontendKey;

/// One node's workloads, by `namespace/name`; shared between versions while
/// they do not change, so most nodes' deltas are found empty at a glance.
pub type NodeWorkloads = Arc<BTreeMap<String, Workload>>;

/// The configuration at one version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    /// Socket load balancing needs every service on every node, so for
    /// services a node's slice is the whole set.
    pub services: BTreeMap<FrontendKey, ServiceEntry>,
    /// Workloads by node: a node's slice is its own.
    pub workloads: BTreeMap<String, NodeWorkloads>,
    /// Every meshed workload by address (every node needs them all, to
    /// know where a tunnel goes).
    pub peers: BTreeMap<IpAddr, PeerEntry>,
    /// Accepted AuthorizationPolicies (every node gets all; few).
    pub policies: Vec<Policy>,
    /// Accepted HTTPRoutes (every node gets all: any node may run a client).
    pub routes: Vec<AcceptedRoute>,
    /// Accepted TrafficPolicies (every node gets all: a client's node and
    /// a destination's both act on them).
    pub traffic: Vec<AcceptedTraffic>,
    /// The services' delta from the version before this one, computed once
    /// and sent to every node that has that version (nearly all of them).
    pub from_previous: Option<Arc<pb::ConfigUpdate>>,
}

impl Snapshot {
    pub fn new(version: u64, declared: Declared) -> Self {
        let services = declared
            .services
            .services
            .into_iter()
            .map(|s| ((s.frontend, s.protocol), s.normalized()))
            .collect();
        let peers = peers(&declared.workloads, &declared.nodes);
        let workloads = by_node(declared.workloads)
            .into_iter()
            .map(|(node, w)| (node, Arc::new(w)))
            .collect();
        Self {
            version,
            services,
            workloads,
            peers,
            policies: declared.policies,
            routes: declared.routes,
            traffic: declared.traffic,
            from_previous: None,
        }
    }

    /// The snapshot after `previous` if `declared` changes anything, with
    /// its services' delta from `previous` computed once.
    pub fn next(previous: Option<&Snapshot>, version: u64, declared: Declared) -> Option<Self> {
        let mut next = Self::new(version, declared);
        let Some(p) = previous else {
            return Some(next);
        };
        for (node, mine) in &mut next.workloads {
            if let Some(theirs) = p.workloads.get(node)
                && theirs == mine
            {
                *mine = Arc::clone(theirs);
            }
        }
        if p.services == next.services
            && p.workloads == next.workloads
            && p.peers == next.peers
            && p.policies == next.policies
            && p.routes == next.routes
            && p.traffic == next.traffic
        {
            return None;
        }
        next.from_previous = Some(Arc::new(next.shared_delta_from(p)));
        Some(next)
    }

    /// The update that brings `node` at `base` to this snapshot.
    pub fn update_for(&self, node: &str, base: Option<&Snapshot>) -> pb::ConfigUpdate {
        let mut update = match (base, &self.from_previous) {
            (Some(b), Some(cached)) if cached.base_version == b.version => (**cached).clone(),
            (Some(b), _) => self.shared_delta_from(b),
            (None, _) => self.full_shared(),
        };
        let empty = BTreeMap::new();
        let mine = self.workloads.get(node).map_or(&empty, |w| &**w);
        let theirs = match base {
            None => &empty,
            Some(b) => match b.workloads.get(node) {
                Some(t) if self.workloads.get(node).is_some_and(|m| Arc::ptr_eq(m, t)) => {
                    return update;
                }
                Some(t) => &**t,
                None => &empty,
            },
        };
        update.workload_upserts = mine
            .iter()
            .filter(|(k, w)| theirs.get(*k) != Some(*w))
            .map(|(_, w)| pb::Workload::from(w))
            .collect();
        update.workload_removes = theirs
            .keys()
            .filter(|k| !mine.contains_key(*k))
            .cloned()
            .collect();
        update
    }

    /// Every service and peer, for a node whose state the controller does
    /// not know.
    fn full_shared(&self) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version: self.version,
            base_version: 0,
            upserts: self.services.values().map(pb::Service::from).collect(),
            peer_upserts: self
                .peers
                .iter()
                .map(|(a, p)| proto::peer_of(*a, p))
                .collect(),
            policies_replaced: true,
            policies: self.policies.iter().map(proto::policy_of).collect(),
            routes_replaced: true,
            routes: self.routes.iter().map(proto::route_of).collect(),
            traffic_replaced: true,
            traffic_policies: self.traffic.iter().map(proto::traffic_of).collect(),
            ..Default::default()
        }
    }

    /// What every node is sent from `base` to `self`: the services and
    /// peers that differ.
    fn shared_delta_from(&self, base: &Snapshot) -> pb::ConfigUpdate {
        let upserts = self
            .services
            .iter()
            .filter(|(k, s)| base.services.get(*k) != Some(*s))
            .map(|(_, s)| pb::Service::from(s))
            .collect();
        let removes = base
            .services
            .keys()
            .filter(|k| !self.services.contains_key(*k))
            .map(|(addr, proto)| proto::key_of(*addr, *proto))
            .collect();
        pb::ConfigUpdate {
            version: self.version,
            base_version: base.version,
            upserts,
            removes,
            peer_upserts: self
                .peers
                .iter()
                .filter(|(a, p)| base.peers.get(*a) != Some(*p))
                .map(|(a, p)| proto::peer_of(*a, p))
                .collect(),
            peer_removes: base
                .peers
                .keys()
                .filter(|a| !self.peers.contains_key(*a))
                .map(|a| proto::address_bytes(*a))
                .collect(),
            policies_replaced: base.policies != self.policies,
            policies: if base.policies == self.policies {
                Vec::new()
            } else {
                self.policies.iter().map(proto::policy_of).collect()
            },
            routes_replaced: base.routes != self.routes,
            routes: if base.routes == self.routes {
                Vec::new()
            } else {
                self.routes.iter().map(proto::route_of).collect()
            },
            traffic_replaced: base.traffic != self.traffic,
            traffic_policies: if base.traffic == self.traffic {
                Vec::new()
            } else {
                self.traffic.iter().map(proto::traffic_of).collect()
            },
            ..Default::default()
        }
    }
}

/// The latest good snapshot (none until the source has loaded once without
/// error: nodes are sent nothing rather than an empty configuration).
pub type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

/// Why a source has no new configuration: what to fix, and where.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    File {
        file: String,
        source: lacewing_core::model::k8s::K8sError,
    },
    #[error(transparent)]
    Model(#[from] lacewing_core::model::k8s::K8sError),
}

/// A source's two outputs, the latest good snapshot and its last error (empty
/// when good), kept the same way whatever the source.
pub struct Publisher {
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    errors: watch::Sender<String>,
}

impl Publisher {
    pub fn new() -> (Self, Snapshots, watch::Receiver<String>) {
        let (snapshots, snap_rx) = watch::channel(None);
        let (errors, err_rx) = watch::channel(String::new());
        (Self { snapshots, errors }, snap_rx, err_rx)
    }

    /// Publishes what the source now declares: a new version if it changes
    /// anything; on error, the error, with the last good snapshot in force.
    pub fn publish(&self, declared: Result<Declared, SourceError>, source: &str) {
        match declared {
            Ok(set) => {
                self.errors.send_replace(String::new());
                let current: Option<Arc<Snapshot>> = self.snapshots.borrow().clone();
                let version = next_version(current.as_ref().map_or(0, |c| c.version));
                if let Some(next) = Snapshot::next(current.as_deref(), version, set) {
                    tracing::info!(%source, version = next.version, services = next.services.len(), "new configuration");
                    self.snapshots.send_replace(Some(Arc::new(next)));
                }
            }
            Err(err) => {
                tracing::error!(%source, %err, "the source has an error; nodes keep the last good configuration");
                self.errors.send_replace(err.to_string());
            }
        }
    }
}

/// Versions increase across controller restarts too (milliseconds since the
/// epoch, or one more than the last), so a node never mistakes a new
/// configuration for one it has.
fn next_version(previous: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    now.max(previous + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lacewing_core::model::services::{Algorithm, BackendEntry};

    fn svc(ip: &str, backends: &[&str]) -> ServiceEntry {
        ServiceEntry {
            name: format!("default/{ip}:http"),
            frontend: format!("{ip}:80").parse().unwrap(),
            protocol: lacewing_core::model::services::Protocol::Tcp,
            algorithm: Algorithm::Random,
            affinity_timeout_s: 0,
            app_protocol: Default::default(),
            backends: backends
                .iter()
                .map(|b| BackendEntry {
                    addr: b.parse().unwrap(),
                    weight: 1,
                })
                .collect(),
        }
    }

    fn declared(services: Vec<ServiceEntry>, workloads: Vec<Workload>) -> Declared {
        Declared {
            services: lacewing_core::model::services::ServiceSet { services },
            workloads,
            nodes: BTreeMap::new(),
            policies: Vec::new(),
            routes: Vec::new(),
            traffic: Vec::new(),
        }
    }

    fn pod(name: &str, node: &str, ip: &str) -> Workload {
        Workload {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node: node.into(),
            service_account: "web".into(),
            addresses: vec![ip.parse().unwrap()],
            meshed: true,
            strict: false,
            access_log: false,
            labels: Default::default(),
        }
    }

    #[test]
    fn a_delta_carries_only_what_changed() {
        let a = svc("10.96.0.1", &["10.244.0.10:80"]);
        let b = svc("10.96.0.2", &["10.244.0.11:80"]);
        let c = svc("10.96.0.3", &["10.244.0.12:80"]);
        let v1 = Snapshot::new(1, declared(vec![a.clone(), b.clone()], vec![]));
        let b2 = svc("10.96.0.2", &["10.244.0.11:80", "10.244.0.13:80"]);
        let v2 = Snapshot::next(
            Some(&v1),
            2,
            declared(vec![a, b2.clone(), c.clone()], vec![]),
        )
        .unwrap();
        let d = v2.update_for("n0", Some(&v1));
        assert_eq!(Some(&d), v2.from_previous.as_deref());
        assert_eq!((d.version, d.base_version), (2, 1));
        assert_eq!(
            d.upserts,
            vec![pb::Service::from(&b2), pb::Service::from(&c)]
        );
        assert!(d.removes.is_empty());
        let v3 = Snapshot::new(3, declared(vec![b2], vec![]));
        let d = v3.update_for("n0", Some(&v2));
        assert!(d.upserts.is_empty());
        assert_eq!(d.removes.len(), 2);
        let full = v3.update_for("n0", None);
        assert_eq!((full.upserts.len(), full.base_version), (1, 0));
    }

    #[test]
    fn a_node_gets_only_its_own_workloads() {
        let v1 = Snapshot::new(
            1,
            declared(
                vec![],
                vec![pod("a", "n0", "10.244.0.10"), pod("b", "n1", "10.244.1.10")],
            ),
        );
        let full = v1.update_for("n0", None);
        assert_eq!(full.workload_upserts.len(), 1);
        assert_eq!(full.workload_upserts[0].name, "a");
        assert!(v1.update_for("n2", None).workload_upserts.is_empty());

        // b moves away from n1; n0 is untouched and its map is shared.
        let v2 = Snapshot::next(
            Some(&v1),
            2,
            declared(
                vec![],
                vec![pod("a", "n0", "10.244.0.10"), pod("c", "n1", "10.244.1.11")],
            ),
        )
        .unwrap();
        assert!(Arc::ptr_eq(&v1.workloads["n0"], &v2.workloads["n0"]));
        let d0 = v2.update_for("n0", Some(&v1));
        assert!(d0.workload_upserts.is_empty() && d0.workload_removes.is_empty());
        let d1 = v2.update_for("n1", Some(&v1));
        assert_eq!(d1.workload_upserts[0].name, "c");
        assert_eq!(d1.workload_removes, ["shop/b"]);
        // Nothing changed: no new version.
        assert!(
            Snapshot::next(
                Some(&v2),
                3,
                declared(
                    vec![],
                    vec![pod("a", "n0", "10.244.0.10"), pod("c", "n1", "10.244.1.11")]
                )
            )
            .is_none()
        );
    }
}
