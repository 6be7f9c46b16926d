//! The proxy's read-only view of the node's state. The node owns the store
//! (what the controller sent, the certificates it holds) and implements
//! [`StateView`]; the proxy only looks things up and waits for changes, so
//! its decisions can be unit-tested against a plain in-memory view.

use std::{net::IpAddr, sync::Arc};

use lacewing_core::{
    model::{
        authorization::Policy,
        workloads::{PeerEntry, Workload},
    },
    pki::Svid,
};
use tokio::sync::watch;

/// A certificate the node holds for an identity, and its serial (which
/// keys the tunnel pool, so a rotated certificate opens new connections).
pub type Certificate = (Arc<Svid>, String);

/// What the proxy reads of the node's state, by index.
pub trait StateView: Send + Sync + 'static {
    /// The workload on this node with this address.
    fn local(&self, ip: IpAddr) -> Option<Arc<Workload>>;
    /// The meshed workload with this address, wherever it runs.
    fn peer(&self, ip: IpAddr) -> Option<PeerEntry>;
    /// The AuthorizationPolicies in force.
    fn policies(&self) -> Arc<Vec<Policy>>;
    /// The certificate the node holds for `identity` (a SPIFFE ID).
    fn certificate(&self, identity: &str) -> Option<Certificate>;
    /// Wakes on every applied configuration version (workloads, policies).
    fn config_changes(&self) -> watch::Receiver<u64>;
    /// Wakes whenever a certificate is stored.
    fn certificate_changes(&self) -> watch::Receiver<u64>;
}

/// A [`StateView`] held in memory: what the unit tests use, and a
/// reference for what each method must answer.
pub struct Fixed {
    pub locals: Vec<Arc<Workload>>,
    pub peers: Vec<(IpAddr, PeerEntry)>,
    pub policies: std::sync::Mutex<Arc<Vec<Policy>>>,
    pub certificates: std::sync::Mutex<Vec<(String, Certificate)>>,
    pub config: watch::Sender<u64>,
    pub certs: watch::Sender<u64>,
}

impl Fixed {
    pub fn new(
        locals: Vec<Workload>,
        peers: Vec<(IpAddr, PeerEntry)>,
        policies: Vec<Policy>,
    ) -> Self {
        Self {
            locals: locals.into_iter().map(Arc::new).collect(),
            peers,
            policies: std::sync::Mutex::new(Arc::new(policies)),
            certificates: std::sync::Mutex::default(),
            config: watch::channel(1).0,
            certs: watch::channel(0).0,
        }
    }

    /// Replaces the policies and wakes those who watch for changes.
    pub fn set_policies(&self, policies: Vec<Policy>) {
        *self.policies.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
        self.config.send_modify(|v| *v += 1);
    }

    /// Stores a certificate and wakes those who wait for one.
    pub fn add_certificate(&self, identity: &str, certificate: Certificate) {
        self.certificates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((identity.to_owned(), certificate));
        self.certs.send_modify(|v| *v += 1);
    }
}

impl StateView for Fixed {
    fn local(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.locals
            .iter()
            .find(|w| w.addresses.contains(&ip))
            .cloned()
    }

    fn peer(&self, ip: IpAddr) -> Option<PeerEntry> {
        self.peers
            .iter()
            .find(|(address, _)| *address == ip)
            .map(|(_, p)| p.clone())
    }

    fn policies(&self) -> Arc<Vec<Policy>> {
        Arc::clone(&self.policies.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn certificate(&self, identity: &str) -> Option<Certificate> {
        self.certificates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(id, _)| id == identity)
            .map(|(_, c)| c.clone())
    }

    fn config_changes(&self) -> watch::Receiver<u64> {
        self.config.subscribe()
    }

    fn certificate_changes(&self) -> watch::Receiver<u64> {
        self.certs.subscribe()
    }
}
