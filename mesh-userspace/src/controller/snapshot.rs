//! What every node is sent: the services of the cluster at one version, and
//! the delta between two versions.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use tokio::sync::watch;

use crate::{
    model::services::{Protocol, ServiceEntry, ServiceSet},
    proto::{self, pb},
};

/// A service frontend's identity.
pub type FrontendKey = (SocketAddr, Protocol);

/// The configuration at one version. Socket load balancing needs every
/// service on every node, so for services a node's slice is the whole set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    pub services: BTreeMap<FrontendKey, ServiceEntry>,
    /// The delta from the version before this one, computed once and sent
    /// to every node that has that version (nearly all of them).
    pub from_previous: Option<Arc<pb::ConfigUpdate>>,
}

impl Snapshot {
    pub fn new(version: u64, set: ServiceSet) -> Self {
        let services = set
            .services
            .into_iter()
            .map(|s| ((s.frontend, s.protocol), s.normalized()))
            .collect();
        Self {
            version,
            services,
            from_previous: None,
        }
    }

    /// The snapshot after `previous` if `set` changes anything, with its
    /// delta from `previous` computed once.
    pub fn next(previous: Option<&Snapshot>, version: u64, set: ServiceSet) -> Option<Self> {
        let mut next = Self::new(version, set);
        match previous {
            Some(p) if p.services == next.services => None,
            Some(p) => {
                next.from_previous = Some(Arc::new(next.delta_from(p)));
                Some(next)
            }
            None => Some(next),
        }
    }

    /// The update that brings a node at `base` to this snapshot.
    pub fn update_for(&self, base: Option<&Snapshot>) -> pb::ConfigUpdate {
        match (base, &self.from_previous) {
            (Some(b), Some(cached)) if cached.base_version == b.version => (**cached).clone(),
            (Some(b), _) => self.delta_from(b),
            (None, _) => self.full(),
        }
    }

    /// Everything, for a node whose state the controller does not know.
    pub fn full(&self) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version: self.version,
            base_version: 0,
            upserts: self.services.values().map(pb::Service::from).collect(),
            removes: Vec::new(),
            partial: false,
        }
    }

    /// What changed from `base` to `self`: only services that differ.
    pub fn delta_from(&self, base: &Snapshot) -> pb::ConfigUpdate {
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
            partial: false,
        }
    }
}

/// The latest good snapshot (none until the source has loaded once without
/// error: nodes are sent nothing rather than an empty configuration).
pub type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

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
    pub fn publish(&self, declared: Result<ServiceSet, String>, source: &str) {
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
                self.errors.send_replace(err);
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
    use crate::model::services::{Algorithm, BackendEntry};

    fn svc(ip: &str, backends: &[&str]) -> ServiceEntry {
        ServiceEntry {
            name: format!("default/{ip}:http"),
            frontend: format!("{ip}:80").parse().unwrap(),
            protocol: Protocol::Tcp,
            algorithm: Algorithm::Random,
            affinity_timeout_s: 0,
            backends: backends
                .iter()
                .map(|b| BackendEntry {
                    addr: b.parse().unwrap(),
                    weight: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn a_delta_carries_only_what_changed() {
        let a = svc("10.96.0.1", &["10.244.0.10:80"]);
        let b = svc("10.96.0.2", &["10.244.0.11:80"]);
        let c = svc("10.96.0.3", &["10.244.0.12:80"]);
        let v1 = Snapshot::new(
            1,
            ServiceSet {
                services: vec![a.clone(), b.clone()],
            },
        );
        let b2 = svc("10.96.0.2", &["10.244.0.11:80", "10.244.0.13:80"]);
        let v2 = Snapshot::new(
            2,
            ServiceSet {
                services: vec![a, b2.clone(), c.clone()],
            },
        );
        let d = v2.delta_from(&v1);
        assert_eq!((d.version, d.base_version), (2, 1));
        assert_eq!(
            d.upserts,
            vec![pb::Service::from(&b2), pb::Service::from(&c)]
        );
        assert!(d.removes.is_empty());
        let v3 = Snapshot::new(3, ServiceSet { services: vec![b2] });
        let d = v3.delta_from(&v2);
        assert!(d.upserts.is_empty());
        assert_eq!(d.removes.len(), 2);
        assert_eq!(v3.full().upserts.len(), 1);
        assert_eq!(v3.full().base_version, 0);
    }
}
