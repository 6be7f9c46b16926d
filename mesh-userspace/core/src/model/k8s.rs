//! Kubernetes objects (YAML or JSON, as `kubectl get -o yaml` prints them)
//! translated into the model: Services and EndpointSlices into the
//! [`ServiceSet`], Pods, Namespaces and ServiceAccounts into workloads, our
//! policies and HTTPRoutes into verdicts (see [`policies`]).
//!
//! Only the fields the load balancer uses are read. Lacewing-specific choices
//! ride on Service annotations until `TrafficPolicy` carries them:
//! - `lacewing.io/lb-algorithm`: `random` (default) or `maglev`;
//! - `lacewing.io/maglev-table-size`: a prime, default 16381;
//! - `lacewing.io/backend-weights`: `10.244.1.10=1,10.244.1.11=2` (default 1).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::{
    api::{core::v1 as corev1, discovery::v1 as discoveryv1},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use super::{
    Declared,
    services::{Algorithm, AppProtocol, BackendEntry, Protocol, ServiceEntry, ServiceSet},
};

pub mod policies;
mod workloads;

use policies::{PolicyDoc, ServiceName, Verdict};

pub const ANNOTATION_ALGORITHM: &str = "lacewing.io/lb-algorithm";
pub const ANNOTATION_MAGLEV_SIZE: &str = "lacewing.io/maglev-table-size";
pub const ANNOTATION_WEIGHTS: &str = "lacewing.io/backend-weights";
/// kube-proxy's default ClientIP affinity timeout (3 hours).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A document that cannot be used, and where.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("document {index}: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("Service {0}: {1}")]
    Service(String, FieldError),
    #[error("{origin}: {source}")]
    Field { origin: String, source: FieldError },
    #[error(
        "{origin}: Pod {namespace}/{pod} runs as ServiceAccount {account}, which does not exist in namespace {namespace}"
    )]
    MissingServiceAccount {
        origin: String,
        namespace: String,
        pod: String,
        account: String,
    },
    #[error("{0}")]
    Invalid(#[from] super::services::InvalidService),
    #[error("{origin}: {source}")]
    In {
        origin: String,
        source: Box<K8sError>,
    },
    #[error("{0}")]
    Rejected(String),
}

/// A field of a Service, an EndpointSlice or a Pod that the model cannot
/// use, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("{field} {value} is not a port number from 1 to 65535")]
    Port { field: &'static str, value: i32 },
    #[error("{field}: `{value}` is not an IP address")]
    Address { field: &'static str, value: String },
    #[error("protocol `{0}` is not one of TCP, UDP, SCTP")]
    Protocol(String),
    #[error("sessionAffinity `{0}` is not one of None, ClientIP")]
    Affinity(String),
    #[error("lacewing.io/lb-algorithm: `{0}` is not one of random, maglev")]
    Algorithm(String),
    #[error("lacewing.io/maglev-table-size: `{0}` is not a number")]
    MaglevSize(String),
    #[error("lacewing.io/backend-weights: `{0}` is not address=weight")]
    WeightPair(String),
    #[error("lacewing.io/backend-weights: `{0}` is not an IP address")]
    WeightAddress(String),
    #[error("lacewing.io/backend-weights: weight `{0}` is not a number from 1 to 65535")]
    WeightNumber(String),
    #[error("lacewing.io/backend-weights: weight of {0} is 0; weights start at 1")]
    ZeroWeight(IpAddr),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub generation: Option<i64>,
}

fn default_ns() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Service {
    metadata: Meta,
    spec: ServiceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    // Kubernetes spells these with a capital IP, which camelCase does not.
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
    #[serde(default)]
    session_affinity: Option<String>,
    #[serde(default)]
    session_affinity_config: Option<AffinityConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientIpConfig {
    timeout_seconds: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSlice {
    metadata: Meta,
    address_type: String,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    ports: Vec<EndpointPort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    addresses: Vec<IpAddr>,
    #[serde(default)]
    conditions: Conditions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conditions {
    /// Kubernetes: a missing `ready` means ready.
    ready: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointPort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct Kind {
    kind: Option<String>,
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

// The typed objects of the Kubernetes API, read into the model's terms. Only
// what the model uses is copied; numbers the API types wider than the model
// (ports as i32) are checked here.

impl From<&ObjectMeta> for Meta {
    fn from(m: &ObjectMeta) -> Self {
        Self {
            name: m.name.clone().unwrap_or_default(),
            namespace: m.namespace.clone().unwrap_or_else(default_ns),
            labels: m.labels.clone().unwrap_or_default(),
            annotations: m.annotations.clone().unwrap_or_default(),
            uid: m.uid.clone(),
            generation: m.generation,
        }
    }
}

/// A port number the API holds as an i32.
pub(crate) fn port_number(field: &'static str, value: i32) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(FieldError::Port { field, value })
}

impl TryFrom<&corev1::Service> for Service {
    type Error = FieldError;

    fn try_from(s: &corev1::Service) -> Result<Self, FieldError> {
        let spec = s.spec.clone().unwrap_or_default();
        Ok(Self {
            metadata: Meta::from(&s.metadata),
            spec: ServiceSpec {
                cluster_ip: spec.cluster_ip,
                cluster_ips: spec.cluster_ips.unwrap_or_default(),
                ports: spec
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| {
                        Ok(ServicePort {
                            port: port_number("spec.ports[].port", p.port)?,
                            name: p.name,
                            protocol: p.protocol,
                            app_protocol: p.app_protocol,
                        })
                    })
                    .collect::<Result<_, FieldError>>()?,
                session_affinity: spec.session_affinity,
                session_affinity_config: spec.session_affinity_config.map(|c| AffinityConfig {
                    client_ip: c.client_ip.map(|c| ClientIpConfig {
                        timeout_seconds: c.timeout_seconds.and_then(|t| u32::try_from(t).ok()),
                    }),
                }),
            },
        })
    }
}

impl TryFrom<&discoveryv1::EndpointSlice> for EndpointSlice {
    type Error = FieldError;

    fn try_from(s: &discoveryv1::EndpointSlice) -> Result<Self, FieldError> {
        let endpoints = s
            .endpoints
            .iter()
            .map(|e| {
                Ok(Endpoint {
                    addresses: e
                        .addresses
                        .iter()
                        .map(|a| {
                            a.parse().map_err(|_| FieldError::Address {
                                field: "endpoints[].addresses",
                                value: a.clone(),
                            })
                        })
                        .collect::<Result<_, FieldError>>()?,
                    conditions: Conditions {
                        ready: e.conditions.as_ref().and_then(|c| c.ready),
                    },
                })
            })
            .collect::<Result<_, FieldError>>()?;
        let ports = s
            .ports
            .iter()
            .flatten()
            // A port without a number means "all ports": nothing a
            // ClusterIP frontend can map to.
            .filter_map(|p| Some((p, p.port?)))
            .map(|(p, port)| {
                Ok(EndpointPort {
                    port: port_number("ports[].port", port)?,
                    name: p.name.clone(),
                    protocol: p.protocol.clone(),
                })
            })
            .collect::<Result<_, FieldError>>()?;
        Ok(Self {
            metadata: Meta::from(&s.metadata),
            address_type: s.address_type.clone(),
            endpoints,
            ports,
        })
    }
}

/// Parses a multi-document YAML text into the set of ClusterIP frontends
/// with their ready backends; any rejected object is an error.
pub fn parse(text: &str) -> Result<ServiceSet, K8sError> {
    let mut objects = Objects::default();
    objects.add_yaml("", text)?;
    Ok(translate_all(&[&objects])?.strict()?.services)
}

/// What a set of objects declares, and the verdict on each policy and route.
#[derive(Debug, Default)]
pub struct Translation {
    pub declared: Declared,
    pub verdicts: Vec<Verdict>,
}

impl Translation {
    /// The model, if no object is rejected (the folder source's rule: one bad
    /// object keeps the whole previous state in force).
    pub fn strict(self) -> Result<Declared, K8sError> {
        match self.verdicts.iter().find_map(Verdict::rejection) {
            Some(why) => Err(K8sError::Rejected(why)),
            None => Ok(self.declared),
        }
    }
}

/// Kubernetes objects gathered from one or more YAML texts, translated
/// together (a Service and its EndpointSlices may come from different files).
#[derive(Debug, Default)]
pub struct Objects {
    /// Each Service with where it came from (`file: document N`).
    services: Vec<(String, Service)>,
    slices: BTreeMap<(String, String), Vec<EndpointSlice>>,
    /// Our policies and HTTPRoutes, as read.
    policies: Vec<PolicyDoc>,
    pods: Vec<(String, workloads::Pod)>,
    /// Namespace labels, by namespace.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// (namespace, name) of each ServiceAccount.
    service_accounts: std::collections::BTreeSet<(String, String)>,
    /// Node addresses, by node.
    nodes: BTreeMap<String, Vec<IpAddr>>,
}

/// One object as the model reads it, before it joins an [`Objects`].
enum Doc {
    Service(String, Service),
    Slice(EndpointSlice),
    Policy(PolicyDoc),
    Pod(String, workloads::Pod),
    Node(workloads::Node),
    /// A Namespace (true) or a ServiceAccount.
    Named(bool, workloads::Named),
}

/// One object of a kind the model reads, typed as the Kubernetes API serves
/// it: what the Kubernetes source's watchers yield (no JSON text in between).
#[expect(
    clippy::large_enum_variant,
    reason = "one object at a time, moved straight into the model's terms"
)]
#[derive(Debug)]
pub enum Typed {
    Service(corev1::Service),
    EndpointSlice(discoveryv1::EndpointSlice),
    Pod(corev1::Pod),
    Node(corev1::Node),
    Namespace(corev1::Namespace),
    ServiceAccount(corev1::ServiceAccount),
    Policy(policies::Policy),
}

impl Objects {
    /// Adds every document of a multi-document YAML text from `origin` (a
    /// file name, for messages); nothing of the text is added when one
    /// document is bad.
    pub fn add_yaml(&mut self, origin: &str, text: &str) -> Result<(), K8sError> {
        let mut docs = Vec::new();
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc_err = |source| K8sError::Yaml { index, source };
            let value = serde_yaml::Value::deserialize(doc).map_err(doc_err)?;
            if value.is_null() {
                continue;
            }
            let kind: Kind = serde_yaml::from_value(value.clone()).map_err(doc_err)?;
            let at = if origin.is_empty() {
                format!("document {index}")
            } else {
                format!("{origin}: document {index}")
            };
            docs.push(match kind.kind.as_deref() {
                Some(kind) if policies::KINDS.contains(&kind) => {
                    Doc::Policy(policies::read(kind, &at, value).map_err(doc_err)?)
                }
                Some("Pod") => Doc::Pod(at, serde_yaml::from_value(value).map_err(doc_err)?),
                Some("Node") => Doc::Node(serde_yaml::from_value(value).map_err(doc_err)?),
                Some(kind @ ("Namespace" | "ServiceAccount")) => Doc::Named(
                    kind == "Namespace",
                    serde_yaml::from_value(value).map_err(doc_err)?,
                ),
                Some("Service") => {
                    Doc::Service(at, serde_yaml::from_value(value).map_err(doc_err)?)
                }
                Some("EndpointSlice") => {
                    Doc::Slice(serde_yaml::from_value(value).map_err(doc_err)?)
                }
                _ => continue,
            });
        }
        for doc in docs {
            self.insert(doc);
        }
        Ok(())
    }

    /// Adds one typed object from `origin` (`Kind namespace/name`, for
    /// messages); an error names the field the model cannot use.
    pub fn add_typed(&mut self, origin: &str, object: Typed) -> Result<(), K8sError> {
        let at = |source| K8sError::Field {
            origin: origin.to_owned(),
            source,
        };
        let doc = match object {
            Typed::Service(s) => {
                Doc::Service(origin.to_owned(), Service::try_from(&s).map_err(at)?)
            }
            Typed::EndpointSlice(s) => Doc::Slice(EndpointSlice::try_from(&s).map_err(at)?),
            Typed::Pod(p) => Doc::Pod(origin.to_owned(), workloads::Pod::try_from(&p).map_err(at)?),
            Typed::Node(n) => Doc::Node(workloads::Node::from(&n)),
            Typed::Namespace(n) => Doc::Named(true, workloads::Named::from(&n.metadata)),
            Typed::ServiceAccount(a) => Doc::Named(false, workloads::Named::from(&a.metadata)),
            Typed::Policy(p) => Doc::Policy(policies::doc(origin, p)),
        };
        self.insert(doc);
        Ok(())
    }

    fn insert(&mut self, doc: Doc) {
        match doc {
            Doc::Service(at, s) => self.services.push((at, s)),
            Doc::Policy(p) => self.policies.push(p),
            Doc::Pod(at, p) => self.pods.push((at, p)),
            Doc::Node(node) => {
                let ips = node.internal_ips();
                self.nodes.insert(node.metadata.name, ips);
            }
            Doc::Named(true, o) => {
                self.namespaces.insert(o.metadata.name, o.metadata.labels);
            }
            Doc::Named(false, o) => {
                self.service_accounts
                    .insert((o.metadata.namespace, o.metadata.name));
            }
            Doc::Slice(slice) => {
                if let Some(svc) = slice.metadata.labels.get(SERVICE_NAME_LABEL) {
                    self.slices
                        .entry((slice.metadata.namespace.clone(), svc.clone()))
                        .or_default()
                        .push(slice);
                }
            }
        }
    }
}

/// What several sets of objects declare together (one per file: a folder
/// re-parses only the files that changed). Malformed Services are errors;
/// policies and routes get verdicts (a rejected one is never sent to a node).
pub fn translate_all(parts: &[&Objects]) -> Result<Translation, K8sError> {
    // Policies and routes may only name Services that exist (ResolvedRefs).
    let known: std::collections::BTreeSet<(&str, &str)> = parts
        .iter()
        .flat_map(|p| p.services.iter())
        .map(|(_, s)| (s.metadata.namespace.as_str(), s.metadata.name.as_str()))
        .collect();
    let mut verdicts = Vec::new();
    let mut authorization = Vec::new();
    let mut routes = Vec::new();
    let mut traffic: Vec<super::traffic::AcceptedTraffic> = Vec::new();
    let mut mesh_config = None;
    // Of two TrafficPolicies for one Service port, the one whose
    // `namespace/name` sorts first applies; the other is `Conflicted`.
    let mut docs: Vec<&PolicyDoc> = parts.iter().flat_map(|p| p.policies.iter()).collect();
    docs.sort_by(|a, b| a.object.cmp(&b.object));
    let mut targeted: BTreeMap<(String, String, Option<u16>), String> = BTreeMap::new();
    for doc in docs {
        let mut verdict = policies::judge(doc, |s: &ServiceName| {
            known.contains(&(s.namespace.as_str(), s.name.as_str()))
        });
        if let (None, Some(t)) = (verdict.rejection(), &doc.traffic) {
            let key = (
                t.namespace.clone(),
                t.spec.target_ref.name.clone(),
                t.spec.target_ref.port,
            );
            match targeted.get(&key) {
                Some(first) => policies::conflict(&mut verdict, first),
                None => {
                    targeted.insert(key, doc.object.to_string());
                    traffic.push((**t).clone());
                }
            }
        }
        // Only accepted policies reach the nodes.
        if let (None, Some(spec)) = (verdict.rejection(), &doc.authorization) {
            authorization.push(super::authorization::Policy {
                namespace: doc.object.namespace.clone().unwrap_or_default(),
                name: doc.object.name.clone(),
                spec: spec.clone(),
            });
        }
        if let (None, Some(route)) = (verdict.rejection(), &doc.route) {
            routes.push((**route).clone());
        }
        if let (None, Some(spec), None) = (verdict.rejection(), &doc.mesh_config, &mesh_config) {
            mesh_config = Some(spec.clone());
        }
        verdicts.push(verdict);
    }
    let mut namespaces = BTreeMap::new();
    let mut service_accounts = std::collections::BTreeSet::new();
    let mut nodes = BTreeMap::new();
    for part in parts {
        nodes.extend(part.nodes.iter().map(|(k, v)| (k.clone(), v.clone())));
        namespaces.extend(part.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
        service_accounts.extend(part.service_accounts.iter().cloned());
    }
    let workloads = workloads::translate(
        parts.iter().flat_map(|p| p.pods.iter()),
        &namespaces,
        &service_accounts,
        mesh_config.as_ref(),
    )?;
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for part in parts {
        for ((ns, name), list) in &part.slices {
            slices
                .entry((ns.as_str(), name.as_str()))
                .or_default()
                .extend(list.iter());
        }
    }
    let mut set = ServiceSet::default();
    for part in parts {
        for (origin, svc) in &part.services {
            let its_slices = slices
                .get(&(svc.metadata.namespace.as_str(), svc.metadata.name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let entries = translate(svc, its_slices).map_err(|e| K8sError::In {
                origin: origin.clone(),
                source: Box::new(e),
            })?;
            set.services.extend(entries);
        }
    }
    check_http_only_fields(&set, &mut traffic, &mut verdicts);
    apply_kernel_choices(&mut set, &super::traffic::PolicyTable::build(&traffic));
    set.validate()?;
    Ok(Translation {
        declared: Declared {
            services: set,
            workloads,
            nodes,
            policies: authorization,
            routes,
            traffic,
        },
        verdicts,
    })
}

/// The Service ports a TrafficPolicy covers: (port, what it speaks).
fn covered_ports(set: &ServiceSet, t: &super::traffic::AcceptedTraffic) -> Vec<(u16, AppProtocol)> {
    let mut ports: Vec<(u16, AppProtocol)> = set
        .services
        .iter()
        .filter(|e| e.protocol == Protocol::Tcp)
        .filter_map(|e| {
            let ((ns, name), port) = e.service_port()?;
            (ns == t.namespace
                && name == t.spec.target_ref.name
                && t.spec.target_ref.port.is_none_or(|p| p == port))
            .then_some((port, e.app_protocol))
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

/// A TrafficPolicy whose per-request fields (`timeout`, `retries`,
/// `circuitBreaker`, `outlierDetection`, `fault`, an HTTP balancing) meet
/// only ports that say they are not HTTP is refused: nothing would act on
/// them. One that covers HTTP ports too is accepted, and its `Accepted`
/// condition says which ports those fields skip.
fn check_http_only_fields(
    set: &ServiceSet,
    traffic: &mut Vec<super::traffic::AcceptedTraffic>,
    verdicts: &mut [Verdict],
) {
    traffic.retain(|t| {
        let Ok(compiled) = super::traffic::compile(&t.namespace, &t.name, &t.spec) else {
            return true;
        };
        if !compiled.needs_requests() {
            return true;
        }
        let ports = covered_ports(set, t);
        let opaque: Vec<String> = ports
            .iter()
            .filter(|(_, a)| *a == AppProtocol::Opaque)
            .map(|(p, _)| p.to_string())
            .collect();
        if opaque.is_empty() {
            return true;
        }
        let Some(verdict) = verdicts.iter_mut().find(|v| {
            v.object.kind == "TrafficPolicy"
                && v.object.namespace.as_deref() == Some(t.namespace.as_str())
                && v.object.name == t.name
        }) else {
            return true;
        };
        let all = opaque.len() == ports.len();
        let message = format!(
            "{}: its timeout, retries, circuitBreaker, outlierDetection, fault and HTTP balancing act on HTTP requests; Service {}/{} port {} does not speak HTTP (appProtocol or port name){}",
            verdict.object,
            t.namespace,
            t.spec.target_ref.name,
            opaque.join(", "),
            if all {
                ": remove those fields or target an HTTP port"
            } else {
                ", where only its other fields apply"
            }
        );
        if let Some(c) = verdict
            .conditions
            .iter_mut()
            .find(|c| c.type_ == crate::api::conditions::ACCEPTED)
        {
            if all {
                c.status = "False".to_owned();
                c.reason = "NotHTTP".to_owned();
            }
            c.message = message;
        }
        !all
    });
}

/// The kernel's algorithm and ClientIP affinity of each Service port a
/// TrafficPolicy names them for (over the Service's annotations and
/// `sessionAffinity`).
fn apply_kernel_choices(set: &mut ServiceSet, table: &super::traffic::PolicyTable) {
    for entry in &mut set.services {
        let Some(p) = entry
            .service_port()
            .and_then(|(service, port)| table.get(&service, port))
        else {
            continue;
        };
        if let Some(algorithm) = p.kernel_algorithm {
            entry.algorithm = algorithm;
        }
        if let Some(timeout) = p.affinity_timeout_s {
            entry.affinity_timeout_s = timeout;
        }
    }
}

fn translate(svc: &Service, slices: &[&EndpointSlice]) -> Result<Vec<ServiceEntry>, K8sError> {
    let id = format!("{}/{}", svc.metadata.namespace, svc.metadata.name);
    let bad = |e: FieldError| K8sError::Service(id.clone(), e);
    let ann = &svc.metadata.annotations;
    let algorithm = match ann.get(ANNOTATION_ALGORITHM).map(String::as_str) {
        None | Some("random") => Algorithm::Random,
        Some("maglev") => match ann.get(ANNOTATION_MAGLEV_SIZE) {
            None => Algorithm::maglev_default(),
            Some(size) => Algorithm::Maglev {
                table_size: size
                    .parse()
                    .map_err(|_| bad(FieldError::MaglevSize(size.clone())))?,
            },
        },
        Some(other) => {
            return Err(bad(FieldError::Algorithm(other.to_owned())));
        }
    };
    let weights = parse_weights(
        ann.get(ANNOTATION_WEIGHTS)
            .map(String::as_str)
            .unwrap_or(""),
    )
    .map_err(bad)?;
    let affinity_timeout_s = match svc.spec.session_affinity.as_deref() {
        Some("ClientIP") => svc
            .spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S),
        None | Some("None") => 0,
        Some(other) => {
            return Err(bad(FieldError::Affinity(other.to_owned())));
        }
    };
    let mut ips: Vec<&str> = svc.spec.cluster_ips.iter().map(String::as_str).collect();
    if ips.is_empty() {
        ips.extend(svc.spec.cluster_ip.as_deref());
    }
    let mut out = Vec::new();
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            continue; // headless: nothing to balance
        }
        let ip: IpAddr = ip.parse().map_err(|_| {
            bad(FieldError::Address {
                field: "spec.clusterIP",
                value: ip.to_owned(),
            })
        })?;
        let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        for port in &svc.spec.ports {
            let protocol = protocol(port.protocol.as_deref()).map_err(bad)?;
            let Some(protocol) = protocol else { continue };
            let mut backends = Vec::new();
            for slice in slices.iter().filter(|s| s.address_type == family) {
                let Some(ep_port) = slice.ports.iter().find(|p| {
                    p.name == port.name
                        && protocol_or_tcp(p.protocol.as_deref())
                            == protocol_or_tcp(port.protocol.as_deref())
                }) else {
                    continue;
                };
                for ep in slice
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.ready != Some(false))
                {
                    for addr in &ep.addresses {
                        let addr = SocketAddr::new(*addr, ep_port.port);
                        if !backends.iter().any(|b: &BackendEntry| b.addr == addr) {
                            backends.push(BackendEntry {
                                addr,
                                weight: weights.get(&addr.ip()).copied().unwrap_or(1),
                            });
                        }
                    }
                }
            }
            out.push(ServiceEntry {
                name: format!(
                    "{id}:{}",
                    port.name.clone().unwrap_or_else(|| port.port.to_string())
                ),
                frontend: SocketAddr::new(ip, port.port),
                protocol,
                algorithm,
                affinity_timeout_s,
                backends,
                app_protocol: AppProtocol::of_port(
                    port.app_protocol.as_deref(),
                    port.name.as_deref(),
                ),
            });
        }
    }
    Ok(out)
}

/// TCP and UDP are balanced; SCTP is skipped (the kernel hooks see it, but we
/// have no use for it yet).
fn protocol(p: Option<&str>) -> Result<Option<Protocol>, FieldError> {
    match p {
        None | Some("TCP") => Ok(Some(Protocol::Tcp)),
        Some("UDP") => Ok(Some(Protocol::Udp)),
        Some("SCTP") => Ok(None),
        Some(other) => Err(FieldError::Protocol(other.to_owned())),
    }
}

fn protocol_or_tcp(p: Option<&str>) -> &str {
    p.unwrap_or("TCP")
}

fn parse_weights(text: &str) -> Result<BTreeMap<IpAddr, u16>, FieldError> {
    let mut out = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (ip, w) = pair
            .split_once('=')
            .ok_or_else(|| FieldError::WeightPair(pair.to_owned()))?;
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| FieldError::WeightAddress(ip.trim().to_owned()))?;
        let w: u16 = w
            .trim()
            .parse()
            .map_err(|_| FieldError::WeightNumber(w.trim().to_owned()))?;
        if w == 0 {
            return Err(FieldError::ZeroWeight(ip));
        }
        out.insert(ip, w);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
