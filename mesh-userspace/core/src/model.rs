//! The one internal model of what the cluster declares, whatever the source
//! (a folder of YAML, a file, Kubernetes), and its translation from
//! Kubernetes objects. Node configuration is built from this, once.

pub mod authorization;
pub mod k8s;
pub mod routes;
pub mod services;
pub mod traffic;
pub mod workloads;

/// Everything the mesh is told, from whatever source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Declared {
    pub services: services::ServiceSet,
    pub workloads: Vec<workloads::Workload>,
    /// Each node's addresses (`InternalIP`), where its tunnel port listens.
    pub nodes: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Accepted AuthorizationPolicies.
    pub policies: Vec<authorization::Policy>,
    /// Accepted HTTPRoutes.
    pub routes: Vec<routes::AcceptedRoute>,
    /// Accepted TrafficPolicies.
    pub traffic: Vec<traffic::AcceptedTraffic>,
}
