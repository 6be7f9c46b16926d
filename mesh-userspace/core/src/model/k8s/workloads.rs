//! Pods, Namespaces and ServiceAccounts, translated into [`Workload`]s.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{api::core::v1 as corev1, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::Deserialize;

use super::{FieldError, K8sError, Meta};
use crate::api::mesh_config::{MeshConfigSpec, MtlsMode};
use crate::model::workloads::{MESH_DISABLED, MESH_ENABLED, MESH_LABEL, Workload};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: Meta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    service_account_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    phase: Option<String>,
    // Kubernetes spells these with a capital IP, which camelCase does not.
    #[serde(default, rename = "podIP")]
    pod_ip: Option<IpAddr>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

#[derive(Debug, Deserialize)]
struct PodIp {
    ip: IpAddr,
}

#[derive(Debug, Deserialize)]
pub struct Named {
    pub metadata: Meta,
}

/// A Node: its name and addresses.
#[derive(Debug, Deserialize)]
pub struct Node {
    pub metadata: Meta,
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Debug, Default, Deserialize)]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Debug, Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    type_: String,
    address: String,
}

impl Node {
    /// Its `InternalIP` addresses: where other nodes reach its tunnel.
    pub fn internal_ips(&self) -> Vec<IpAddr> {
        self.status
            .addresses
            .iter()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect()
    }
}

impl TryFrom<&corev1::Pod> for Pod {
    type Error = FieldError;

    fn try_from(p: &corev1::Pod) -> Result<Self, FieldError> {
        let ip = |field: &'static str, a: &str| {
            a.parse().map_err(|_| FieldError::Address {
                field,
                value: a.to_owned(),
            })
        };
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        Ok(Self {
            metadata: Meta::from(&p.metadata),
            spec: PodSpec {
                node_name: spec.and_then(|s| s.node_name.clone()),
                service_account_name: spec.and_then(|s| s.service_account_name.clone()),
            },
            status: PodStatus {
                phase: status.and_then(|s| s.phase.clone()),
                pod_ip: status
                    .and_then(|s| s.pod_ip.as_deref())
                    .map(|a| ip("status.podIP", a))
                    .transpose()?,
                pod_ips: status
                    .and_then(|s| s.pod_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        Ok(PodIp {
                            ip: ip("status.podIPs[].ip", &a.ip)?,
                        })
                    })
                    .collect::<Result<_, FieldError>>()?,
            },
        })
    }
}

impl From<&ObjectMeta> for Named {
    fn from(m: &ObjectMeta) -> Self {
        Self {
            metadata: Meta::from(m),
        }
    }
}

impl From<&corev1::Node> for Node {
    fn from(n: &corev1::Node) -> Self {
        Self {
            metadata: Meta::from(&n.metadata),
            status: NodeStatus {
                addresses: n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|a| NodeAddress {
                        type_: a.type_.clone(),
                        address: a.address.clone(),
                    })
                    .collect(),
            },
        }
    }
}

/// Whether meshed pods of `namespace` are STRICT: the MeshConfig's
/// per-namespace override, else its default (STRICT); with no MeshConfig,
/// PERMISSIVE, so enrolling a namespace breaks no plain-text client (as
/// Istio and Linkerd default).
fn strict(mesh_config: Option<&MeshConfigSpec>, namespace: &str) -> bool {
    let Some(mc) = mesh_config else {
        return false;
    };
    let mode = mc
        .namespaces
        .iter()
        .find(|n| n.namespace == namespace)
        .and_then(|n| n.mtls_mode)
        .unwrap_or(mc.mtls_mode);
    mode == MtlsMode::Strict
}

/// Whether meshed pods of `namespace` are access-logged: the MeshConfig's
/// per-namespace `accessLogging`, else its own (off by default).
fn access_logged(mesh_config: Option<&MeshConfigSpec>, namespace: &str) -> bool {
    let Some(mc) = mesh_config else {
        return false;
    };
    mc.namespaces
        .iter()
        .find(|n| n.namespace == namespace)
        .and_then(|n| n.access_logging)
        .unwrap_or(mc.access_logging)
}

/// The ServiceAccount every namespace has, which a pod naming none uses.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The workloads these pods make: scheduled and not finished (with no
/// address yet while their network comes up).
/// A pod naming a ServiceAccount that is not declared is an error (the API
/// server's admission refuses such a pod), reported by `origin`.
pub fn translate<'a>(
    pods: impl Iterator<Item = &'a (String, Pod)>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    service_accounts: &BTreeSet<(String, String)>,
    mesh_config: Option<&MeshConfigSpec>,
) -> Result<Vec<Workload>, K8sError> {
    let mut out = Vec::new();
    for (origin, pod) in pods {
        let meta = &pod.metadata;
        let Some(node) = pod.spec.node_name.clone() else {
            continue; // not scheduled yet
        };
        if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let mut addresses: Vec<IpAddr> = pod.status.pod_ips.iter().map(|p| p.ip).collect();
        if addresses.is_empty() {
            addresses.extend(pod.status.pod_ip);
        }
        // A pod without addresses yet is still sent: its node's CNI plugin
        // hands over the addresses when the pod's network comes up, and
        // the node must know by then whether to capture it.
        let sa = pod
            .spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
        if sa != DEFAULT_SERVICE_ACCOUNT
            && !service_accounts.contains(&(meta.namespace.clone(), sa.clone()))
        {
            return Err(K8sError::MissingServiceAccount {
                origin: origin.clone(),
                namespace: meta.namespace.clone(),
                pod: meta.name.clone(),
                account: sa,
            });
        }
        let ns_enabled = namespaces
            .get(&meta.namespace)
            .and_then(|labels| labels.get(MESH_LABEL))
            .is_some_and(|v| v == MESH_ENABLED);
        let pod_disabled = meta
            .labels
            .get(MESH_LABEL)
            .is_some_and(|v| v == MESH_DISABLED);
        out.push(Workload {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            uid: meta.uid.clone().unwrap_or_default(),
            node,
            service_account: sa,
            addresses,
            meshed: ns_enabled && !pod_disabled,
            labels: meta.labels.clone(),
            strict: ns_enabled && !pod_disabled && strict(mesh_config, &meta.namespace),
            access_log: ns_enabled && !pod_disabled && access_logged(mesh_config, &meta.namespace),
        });
    }
    Ok(out)
}
