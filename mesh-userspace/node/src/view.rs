//! The node's state as the proxy sees it ([`lacewing_proxy::state::StateView`]):
//! the workloads and policies the controller sent, and the certificates
//! this node holds.

use std::{net::IpAddr, sync::Arc};

use lacewing_core::model::{
    authorization::Policy,
    workloads::{PeerEntry, Workload},
};
use lacewing_proxy::state::{Certificate, StateView};
use tokio::sync::watch;

use super::{identity::Identities, workloads::LocalWorkloads};

pub struct NodeView {
    pub workloads: Arc<LocalWorkloads>,
    pub identities: Arc<Identities>,
}

impl StateView for NodeView {
    fn local(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workloads.local(ip)
    }

    fn peer(&self, ip: IpAddr) -> Option<PeerEntry> {
        self.workloads.peer(ip)
    }

    fn policies(&self) -> Arc<Vec<Policy>> {
        self.workloads.policies()
    }

    fn routes(&self) -> Arc<lacewing_core::model::routes::RouteTable> {
        self.workloads.routes()
    }

    fn certificate(&self, identity: &str) -> Option<Certificate> {
        self.identities.get(identity)
    }

    fn config_changes(&self) -> watch::Receiver<u64> {
        self.workloads.watch()
    }

    fn certificate_changes(&self) -> watch::Receiver<u64> {
        self.identities.watch()
    }
}
