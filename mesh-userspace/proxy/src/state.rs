//! The proxy's read-only view of the node's state. The node owns the store
//! (what the controller sent, the certificates it holds) and implements
//! [`StateView`]; the proxy only looks things up and waits for changes, so
//! its decisions can be unit-tested against a plain in-memory view
//! ([`crate::testing::Fixed`], feature `test-support`).

use std::{net::IpAddr, sync::Arc};

use lacewing_core::{
    model::{
        authorization::Policy,
        routes::RouteTable,
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
    /// The HTTP routes in force, by Service frontend.
    fn routes(&self) -> Arc<RouteTable>;
    /// The certificate the node holds for `identity` (a SPIFFE ID).
    fn certificate(&self, identity: &str) -> Option<Certificate>;
    /// Wakes on every applied configuration version (workloads, policies).
    fn config_changes(&self) -> watch::Receiver<u64>;
    /// Wakes whenever a certificate is stored.
    fn certificate_changes(&self) -> watch::Receiver<u64>;
}
