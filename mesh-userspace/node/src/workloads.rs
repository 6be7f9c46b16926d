//! What the controller last sent about workloads: those scheduled on this
//! node (the pods it captures and whose identities it may ask for) and every
//! meshed workload's address with its node (where tunnels go). Shown at
//! `/status` on :15020 (like ztunnel's config dump).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use serde::Serialize;

use std::net::IpAddr;

use lacewing_core::model::{
    authorization::Policy,
    routes::{AcceptedRoute, RouteTable},
    traffic::AcceptedTraffic,
    workloads::{PeerEntry, Workload},
};
use lacewing_core::proto::{self, pb};

#[derive(Debug)]
pub struct LocalWorkloads {
    state: Mutex<State>,
    /// The applied version, for those who wait for changes.
    version: tokio::sync::watch::Sender<u64>,
    /// Addresses the CNI plugin handed over, by `namespace/name`: a pod's
    /// addresses reach the API server only after its network is up, so
    /// until the controller sends them these stand in.
    handed: Mutex<BTreeMap<String, Vec<IpAddr>>>,
}

impl Default for LocalWorkloads {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            version: tokio::sync::watch::channel(0).0,
            handed: Mutex::default(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct State {
    version: u64,
    workloads: BTreeMap<String, Workload>,
    peers: BTreeMap<IpAddr, PeerEntry>,
    policies: Arc<Vec<Policy>>,
    /// Accepted HTTPRoutes, as sent.
    routes: Arc<Vec<AcceptedRoute>>,
    /// Accepted TrafficPolicies, as sent.
    traffic: Arc<Vec<AcceptedTraffic>>,
    /// The routes over the services, by frontend: built by the caller of
    /// [`LocalWorkloads::next`], which holds the services.
    pub table: Arc<RouteTable>,
    /// This node's workloads by address: looked up for every connection.
    by_address: BTreeMap<IpAddr, Arc<Workload>>,
}

/// One workload as `/status` shows it.
#[derive(Serialize)]
struct Shown<'a> {
    namespace: &'a str,
    name: &'a str,
    service_account: &'a str,
    addresses: &'a [std::net::IpAddr],
    meshed: bool,
}

#[derive(Serialize)]
struct Status<'a, C> {
    node: &'a str,
    /// The daemon answering: its process and layout (two run on a node
    /// during an upgrade; the one accepting answers).
    pid: u32,
    layout: u32,
    /// Worker threads carrying its connections, as started.
    workers: usize,
    version: u64,
    workloads: Vec<Shown<'a>>,
    /// Meshed workloads known cluster-wide.
    peers: usize,
    /// The certificates the node holds (the identity manager's to show).
    certificates: C,
}

impl State {
    /// The HTTPRoutes of this state.
    pub fn routes(&self) -> &[AcceptedRoute] {
        &self.routes
    }

    /// The TrafficPolicies of this state.
    pub fn traffic(&self) -> &[AcceptedTraffic] {
        &self.traffic
    }
}

impl LocalWorkloads {
    /// The state after `update`, or why it cannot be applied; nothing
    /// changes here until [`replace`](Self::replace).
    pub fn next(&self, update: &pb::ConfigUpdate, node: &str) -> Result<State, proto::BadMessage> {
        let mut next = if update.base_version == 0 {
            State::default()
        } else {
            self.lock().clone()
        };
        next.version = update.version;
        for key in &update.workload_removes {
            next.workloads.remove(key);
        }
        for w in &update.workload_upserts {
            let w = proto::workload_from(w, node)?;
            next.workloads.insert(w.key(), w);
        }
        fill_handed(
            &mut next.workloads,
            &self.handed.lock().unwrap_or_else(|p| p.into_inner()),
        );
        for a in &update.peer_removes {
            next.peers.remove(&proto::address_from(a)?);
        }
        for p in &update.peer_upserts {
            let (address, peer) = proto::peer_from(p)?;
            next.peers.insert(address, peer);
        }
        next.by_address = by_address(&next.workloads);
        if update.routes_replaced {
            next.routes = Arc::new(
                update
                    .routes
                    .iter()
                    .map(proto::route_from)
                    .collect::<Result<_, _>>()?,
            );
        }
        if update.traffic_replaced {
            next.traffic = Arc::new(
                update
                    .traffic_policies
                    .iter()
                    .map(proto::traffic_from)
                    .collect::<Result<_, _>>()?,
            );
        }
        if update.policies_replaced {
            next.policies = Arc::new(
                update
                    .policies
                    .iter()
                    .map(proto::policy_from)
                    .collect::<Result<_, _>>()?,
            );
        }
        Ok(next)
    }

    /// Takes the addresses the CNI plugin handed over for `key`: they stand
    /// in while the controller sends none.
    pub fn hand_addresses(&self, key: &str, addresses: Vec<IpAddr>) {
        let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        handed.insert(key.to_owned(), addresses);
        let mut state = self.lock();
        if fill_handed(&mut state.workloads, &handed) {
            state.by_address = by_address(&state.workloads);
            let version = state.version;
            drop(state);
            self.version.send_replace(version);
        }
    }

    /// Forgets what the CNI plugin handed over for `key` (the pod is gone).
    pub fn forget_addresses(&self, key: &str) {
        self.handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// The namespaces of every meshed workload this node knows of, here or
    /// on other nodes.
    pub fn meshed_namespaces(&self) -> std::collections::BTreeSet<String> {
        let state = self.lock();
        state
            .workloads
            .values()
            .filter(|w| w.meshed)
            .map(|w| w.namespace.clone())
            .chain(state.peers.values().map(|p| p.namespace.clone()))
            .collect()
    }

    pub fn replace(&self, state: State) {
        let version = state.version;
        *self.lock() = state;
        self.version.send_replace(version);
    }

    /// The workload on this node with this address.
    pub fn local(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.lock().by_address.get(&ip).cloned()
    }

    /// The AuthorizationPolicies in force.
    pub fn policies(&self) -> Arc<Vec<Policy>> {
        Arc::clone(&self.lock().policies)
    }

    /// The HTTP routes in force, by frontend.
    pub fn routes(&self) -> Arc<RouteTable> {
        Arc::clone(&self.lock().table)
    }

    /// The meshed workload with this address, wherever it runs.
    pub fn peer(&self, ip: IpAddr) -> Option<PeerEntry> {
        self.lock().peers.get(&ip).cloned()
    }

    /// Meshed workloads on this node (what capture and inbound handle),
    /// some perhaps without an address yet.
    pub fn meshed(&self) -> Vec<Workload> {
        self.lock()
            .workloads
            .values()
            .filter(|w| w.meshed)
            .cloned()
            .collect()
    }

    /// Wakes on every applied version.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The identities of the meshed workloads here, each with one pod that
    /// carries it (namespace, name): what the node asks certificates for.
    pub fn meshed_identities(&self, trust_domain: &str) -> BTreeMap<String, (String, String)> {
        self.lock()
            .workloads
            .values()
            .filter(|w| w.meshed)
            .map(|w| {
                (
                    w.identity(trust_domain),
                    (w.namespace.clone(), w.name.clone()),
                )
            })
            .collect()
    }

    /// A workload here by `namespace/name`.
    pub fn by_key(&self, key: &str) -> Option<Arc<Workload>> {
        let state = self.lock();
        let w = state.workloads.get(key)?;
        w.addresses
            .iter()
            .find_map(|a| state.by_address.get(a).cloned())
            .or_else(|| Some(Arc::new(w.clone())))
    }

    /// `/status` JSON.
    pub fn status_json(&self, node: &str, certificates: impl Serialize) -> String {
        let state = self.lock();
        let status = Status {
            node,
            pid: std::process::id(),
            layout: crate::maps::layout(),
            workers: lacewing_sys::workers::count(),
            version: state.version,
            workloads: state
                .workloads
                .values()
                .map(|w| Shown {
                    namespace: &w.namespace,
                    name: &w.name,
                    service_account: &w.service_account,
                    addresses: &w.addresses,
                    meshed: w.meshed,
                })
                .collect(),
            peers: state.peers.len(),
            certificates,
        };
        serde_json::to_string_pretty(&status).unwrap_or_default()
    }

    /// The admin endpoint's dump of this state: every workload here with
    /// its identity and switches, every meshed peer, the policies as sent.
    pub fn dump(&self, trust_domain: &str) -> serde_json::Value {
        let state = self.lock();
        serde_json::json!({
            "version": state.version,
            "workloads": state.workloads.values().map(|w| serde_json::json!({
                "namespace": w.namespace,
                "name": w.name,
                "identity": w.identity(trust_domain),
                "addresses": w.addresses,
                "meshed": w.meshed,
                "mtls": if !w.meshed { "none" } else if w.strict { "STRICT" } else { "PERMISSIVE" },
                "access_log": w.access_log,
                "labels": w.labels,
            })).collect::<Vec<_>>(),
            "peers": state.peers.iter().map(|(ip, p)| serde_json::json!({
                "address": ip,
                "identity": p.identity(trust_domain),
                "node": p.node,
            })).collect::<Vec<_>>(),
            "authorization_policies": state.policies.iter().map(|p| serde_json::json!({
                "name": p.key(),
                "spec": p.spec,
            })).collect::<Vec<_>>(),
            "traffic_policies": state.traffic.iter().map(|t| serde_json::json!({
                "name": format!("{}/{}", t.namespace, t.name),
                "spec": t.spec,
            })).collect::<Vec<_>>(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Gives workloads the controller sent without addresses those the CNI
/// plugin handed over; returns whether any changed.
fn fill_handed(
    workloads: &mut BTreeMap<String, Workload>,
    handed: &BTreeMap<String, Vec<IpAddr>>,
) -> bool {
    let mut changed = false;
    for (key, addresses) in handed {
        if let Some(w) = workloads.get_mut(key)
            && w.addresses.is_empty()
        {
            w.addresses.clone_from(addresses);
            changed = true;
        }
    }
    changed
}

fn by_address(workloads: &BTreeMap<String, Workload>) -> BTreeMap<IpAddr, Arc<Workload>> {
    workloads
        .values()
        .flat_map(|w| {
            let w = Arc::new(w.clone());
            w.addresses
                .clone()
                .into_iter()
                .map(move |a| (a, Arc::clone(&w)))
        })
        .collect()
}
