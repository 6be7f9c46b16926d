//! Test support (feature `test-support`, and this crate's own tests): a
//! [`StateView`] held in memory and a [`SocketFactory`] of plain sockets, so
//! the proxy's services run without root or a node. Not in a production
//! build.

use std::{io, net::IpAddr, net::SocketAddr, sync::Arc};

use futures::future::BoxFuture;
use lacewing_core::model::{
    authorization::Policy,
    workloads::{PeerEntry, Workload},
};
use tokio::{net::TcpStream, sync::watch};

use crate::{
    sockets::{PodNetns, SocketFactory},
    splice::Watch,
    state::{Certificate, StateView},
};

/// A [`StateView`] held in memory: what the unit tests use, and a
/// reference for what each method must answer.
pub struct Fixed {
    pub locals: Vec<Arc<Workload>>,
    pub peers: Vec<(IpAddr, PeerEntry)>,
    pub policies: std::sync::Mutex<Arc<Vec<Policy>>>,
    pub routes: std::sync::Mutex<Arc<lacewing_core::model::routes::RouteTable>>,
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
            routes: std::sync::Mutex::default(),
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

    fn routes(&self) -> Arc<lacewing_core::model::routes::RouteTable> {
        Arc::clone(&self.routes.lock().unwrap_or_else(|p| p.into_inner()))
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

/// Plain sockets in the caller's namespace, no marks, no acceleration:
/// for tests without root.
#[derive(Debug, Default)]
pub struct Plain;

impl SocketFactory for Plain {
    fn connect_from(
        &self,
        _netns: &PodNetns,
        dest: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(dest))
    }

    fn connect_delivery(&self, dest: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(dest))
    }

    fn watch(&self, _socket: &TcpStream, _netns_cookie: u64) -> Option<Arc<Watch>> {
        None
    }
}
