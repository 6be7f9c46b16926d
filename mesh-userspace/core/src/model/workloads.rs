//! Workloads: the pods the mesh knows, with the node they run on and the
//! identity they get. A node is sent only the workloads scheduled on it (the
//! pods it captures and whose certificates it may ask for).

use std::{collections::BTreeMap, net::IpAddr};

/// Namespace label that puts its pods in the mesh (`enabled`); on a pod,
/// `disabled` takes that one pod out, as Istio's and Linkerd's opt-outs do.
pub const MESH_LABEL: &str = "lacewing.io/mesh";
pub const MESH_ENABLED: &str = "enabled";
pub const MESH_DISABLED: &str = "disabled";

/// One running pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The node it is scheduled on.
    pub node: String,
    /// Its identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<this>`.
    pub service_account: String,
    /// Its pod IPs (one per family).
    pub addresses: Vec<IpAddr>,
    /// Whether its traffic is captured and carried in mutual TLS.
    pub meshed: bool,
    /// Pod labels, which policy selectors match.
    pub labels: BTreeMap<String, String>,
    /// Meshed and STRICT: plain-text connections to it are refused.
    pub strict: bool,
    /// Its connections and requests are access-logged (MeshConfig
    /// `accessLogging`, for its namespace).
    pub access_log: bool,
}

impl Workload {
    /// `namespace/name`, the key workloads are sent and removed by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The SPIFFE ID of its service account.
    pub fn identity(&self, trust_domain: &str) -> String {
        crate::identity::Identity::workload(trust_domain, &self.namespace, &self.service_account)
            .to_string()
    }
}

/// All workloads, by node, then by `namespace/name`.
pub type WorkloadsByNode = BTreeMap<String, BTreeMap<String, Workload>>;

/// Groups workloads by the node they run on.
pub fn by_node(workloads: impl IntoIterator<Item = Workload>) -> WorkloadsByNode {
    let mut out = WorkloadsByNode::new();
    for w in workloads {
        out.entry(w.node.clone()).or_default().insert(w.key(), w);
    }
    out
}

/// A meshed workload as every node sees it: enough to open a tunnel to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerEntry {
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub node_address: IpAddr,
}

impl PeerEntry {
    pub fn identity(&self, trust_domain: &str) -> String {
        crate::identity::Identity::workload(trust_domain, &self.namespace, &self.service_account)
            .to_string()
    }
}

/// Every meshed workload address on a node with a known address.
pub fn peers<'a>(
    workloads: impl IntoIterator<Item = &'a Workload>,
    nodes: &BTreeMap<String, Vec<IpAddr>>,
) -> BTreeMap<IpAddr, PeerEntry> {
    let mut out = BTreeMap::new();
    for w in workloads.into_iter().filter(|w| w.meshed) {
        let Some(node_address) = nodes.get(&w.node).and_then(|a| a.first()) else {
            continue;
        };
        for addr in &w.addresses {
            out.insert(
                *addr,
                PeerEntry {
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    node: w.node.clone(),
                    node_address: *node_address,
                },
            );
        }
    }
    out
}
