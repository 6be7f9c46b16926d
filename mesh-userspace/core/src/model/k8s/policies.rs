//! Our policies and Gateway API HTTPRoutes: each is checked on its own (its
//! shape, its identities) when read, and against the Services that exist when
//! everything is translated. The outcome is a [`Verdict`] per object, with the
//! `Accepted` and `ResolvedRefs` conditions written to its status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::{
    authorization::{AuthorizationPolicy, check_principal},
    conditions::{ACCEPTED, Condition, RESOLVED_REFS},
    http_route::HttpRoute,
    mesh_config::MeshConfig,
    traffic::TrafficPolicy,
};

/// The kinds handled here.
pub const KINDS: [&str; 4] = [
    "AuthorizationPolicy",
    "TrafficPolicy",
    "MeshConfig",
    "HTTPRoute",
];

/// An object a status is written to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: String,
    /// None for cluster-scoped kinds (MeshConfig).
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A Service a policy or route names, as Gateway API spells a parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// One policy or route as read, before the Services are known.
#[derive(Clone, Debug)]
pub struct PolicyDoc {
    pub object: ObjectRef,
    /// `file: document N` or `Kind ns/name`, for messages.
    pub origin: String,
    pub generation: Option<i64>,
    /// Why it is not acceptable on its own, if it is not: (reason, message).
    pub invalid: Option<(&'static str, String)>,
    /// A reference of a kind that cannot be followed (`ResolvedRefs=False`
    /// with this reason and message).
    pub bad_reference: Option<(&'static str, String)>,
    /// The Services it names.
    pub references: Vec<ServiceName>,
    /// HTTPRoute parents of kind Service (GAMMA): its status has one entry each.
    pub parents: Vec<ServiceName>,
    /// An AuthorizationPolicy's spec, which nodes enforce once accepted.
    pub authorization: Option<crate::api::authorization::AuthorizationPolicySpec>,
    /// A MeshConfig's spec, in force once accepted.
    pub mesh_config: Option<crate::api::mesh_config::MeshConfigSpec>,
    /// An HTTPRoute, which nodes apply once accepted.
    pub route: Option<Box<crate::model::routes::AcceptedRoute>>,
    /// A TrafficPolicy, which nodes apply once accepted.
    pub traffic: Option<Box<crate::model::traffic::AcceptedTraffic>>,
    /// Fields set that the data path does not act on yet (`spec.timeout`):
    /// the object is not accepted while it has any, so its status never
    /// claims what no node does.
    pub unsupported: Vec<String>,
}

/// What the controller decided about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub object: ObjectRef,
    pub origin: String,
    pub generation: Option<i64>,
    pub conditions: Vec<Condition>,
    pub parents: Vec<ServiceName>,
}

impl Verdict {
    /// The error to report when the object is rejected: where, what, and the
    /// condition a cluster would show.
    pub fn rejection(&self) -> Option<String> {
        // A broken reference or shape first: it is what to fix first.
        let failed = || self.conditions.iter().filter(|c| c.status == "False");
        failed()
            .find(|c| c.reason != UNSUPPORTED)
            .or_else(|| failed().next())
            .map(|c| {
                format!(
                    "{}: {} ({}: False, reason {})",
                    self.origin, c.message, c.type_, c.reason
                )
            })
    }
}

/// One of our policies or an HTTPRoute, typed.
#[expect(
    clippy::large_enum_variant,
    reason = "one object at a time, moved straight into the model's terms"
)]
#[derive(Debug)]
pub enum Policy {
    Authorization(AuthorizationPolicy),
    Traffic(TrafficPolicy),
    Mesh(MeshConfig),
    Route(HttpRoute),
}

/// Reads one of our policies or an HTTPRoute (a YAML document of `kind`)
/// from `origin`: an error if it is malformed; a [`PolicyDoc`] saying what
/// is wrong with it if it is well-formed but wrong on its own.
pub fn read(
    kind: &str,
    origin: &str,
    value: serde_yaml::Value,
) -> Result<PolicyDoc, serde_yaml::Error> {
    let policy = match kind {
        "AuthorizationPolicy" => Policy::Authorization(serde_yaml::from_value(value)?),
        "TrafficPolicy" => Policy::Traffic(serde_yaml::from_value(value)?),
        "MeshConfig" => Policy::Mesh(serde_yaml::from_value(value)?),
        _ => Policy::Route(serde_yaml::from_value(value)?),
    };
    Ok(doc(origin, policy))
}

/// What one policy or route says on its own, read from `origin`.
pub fn doc(origin: &str, policy: Policy) -> PolicyDoc {
    let kind = match &policy {
        Policy::Authorization(_) => "AuthorizationPolicy",
        Policy::Traffic(_) => "TrafficPolicy",
        Policy::Mesh(_) => "MeshConfig",
        Policy::Route(_) => "HTTPRoute",
    };
    let object = |m: &ObjectMeta, namespaced: bool| ObjectRef {
        kind: kind.to_owned(),
        namespace: namespaced.then(|| m.namespace.clone().unwrap_or_else(super::default_ns)),
        name: m.name.clone().unwrap_or_default(),
    };
    let doc = |object: ObjectRef, generation| PolicyDoc {
        object,
        origin: origin.to_owned(),
        generation,
        invalid: None,
        bad_reference: None,
        references: Vec::new(),
        parents: Vec::new(),
        authorization: None,
        mesh_config: None,
        route: None,
        traffic: None,
        unsupported: Vec::new(),
    };
    match policy {
        Policy::Authorization(p) => {
            let mut d = doc(object(&p.metadata, true), p.metadata.generation);
            d.invalid = p
                .spec
                .rules
                .iter()
                .flat_map(|r| &r.from)
                .flat_map(|f| &f.principals)
                .find_map(|principal| check_principal(principal).err())
                .map(|e| ("InvalidPrincipal", format!("{}: {e}", d.object)));
            d.authorization = Some(p.spec);
            d
        }
        Policy::Traffic(p) => {
            let mut d = doc(object(&p.metadata, true), p.metadata.generation);
            d.references.push(ServiceName {
                namespace: d.object.namespace.clone().unwrap_or_default(),
                name: p.spec.target_ref.name.clone(),
            });
            let namespace = d.object.namespace.clone().unwrap_or_default();
            if let Err(e) = crate::model::traffic::compile(&namespace, &d.object.name, &p.spec) {
                d.invalid = Some(("Invalid", format!("{}: {e}", d.object)));
            }
            d.traffic = Some(Box::new(crate::model::traffic::AcceptedTraffic {
                namespace,
                name: d.object.name.clone(),
                spec: p.spec,
            }));
            d
        }
        Policy::Mesh(m) => {
            let mut d = doc(object(&m.metadata, false), m.metadata.generation);
            if let Some(td) = &m.spec.trust_domain
                && (td.is_empty() || td.contains('/'))
            {
                d.invalid = Some((
                    "InvalidTrustDomain",
                    format!(
                        "{}: trustDomain `{td}` must be a name such as cluster.local",
                        d.object
                    ),
                ));
            }
            if m.spec.trust_domain.is_some() && d.invalid.is_none() {
                // The trust domain is the controller's and the nodes'
                // (--trust-domain): one set here would not change them.
                d.unsupported.push("spec.trustDomain".to_owned());
            }
            d.mesh_config = Some(m.spec);
            d
        }
        Policy::Route(r) => {
            let object = object(&r.metadata, true);
            let ns = object.namespace.clone().unwrap_or_default();
            let mut d = doc(object, r.metadata.generation);
            let service = |b: &crate::api::http_route::BackendRef| ServiceName {
                namespace: b.namespace.clone().unwrap_or_else(|| ns.clone()),
                name: b.name.clone(),
            };
            d.parents = r
                .spec
                .parent_refs
                .iter()
                .filter(|b| b.is_service())
                .map(service)
                .collect();
            d.references = d
                .parents
                .iter()
                .cloned()
                .chain(
                    r.spec
                        .rules
                        .iter()
                        .flat_map(|rule| &rule.backend_refs)
                        .filter(|b| b.is_service())
                        .map(service),
                )
                .collect();
            // Rules are checked (and compiled) here, so a route that no node
            // could apply is refused with Gateway API's reason.
            let id = crate::model::routes::RouteId {
                namespace: ns.clone(),
                name: d.object.name.clone(),
            };
            if let Err(e) = crate::model::routes::compile(&id, &r.spec) {
                let problem = (e.reason(), format!("{}: {e}", d.object));
                if e.is_reference() {
                    d.bad_reference = Some(problem);
                } else {
                    d.invalid = Some(problem);
                }
            }
            d.route = Some(Box::new(crate::model::routes::AcceptedRoute {
                namespace: ns,
                name: d.object.name.clone(),
                created: r
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.timestamp()),
                spec: r.spec,
            }));
            d
        }
    }
}

/// The `Accepted=False` reason of an object that sets a field no node acts
/// on yet.
pub const UNSUPPORTED: &str = "Unsupported";

/// Marks `verdict` (a TrafficPolicy) not accepted: `first` already applies
/// to the same Service port.
pub fn conflict(verdict: &mut Verdict, first: &str) {
    if let Some(c) = verdict.conditions.iter_mut().find(|c| c.type_ == ACCEPTED) {
        c.status = "False".to_owned();
        c.reason = "Conflicted".to_owned();
        c.message = format!(
            "{}: {first} already applies to the same Service port; one TrafficPolicy applies per port (the first by namespace/name)",
            verdict.object
        );
    }
}

/// The verdict on `doc` given whether each Service exists.
pub fn judge(doc: &PolicyDoc, service_exists: impl Fn(&ServiceName) -> bool) -> Verdict {
    let condition = |type_: &str, ok: bool, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: doc.generation,
        last_transition_time: None,
    };
    let accepted = match &doc.invalid {
        None if doc.unsupported.is_empty() => condition(ACCEPTED, true, "Accepted", String::new()),
        None => condition(
            ACCEPTED,
            false,
            UNSUPPORTED,
            format!(
                "{}: {} not enforced by the data path yet; it is not applied until {} removed",
                doc.object,
                doc.unsupported.join(", "),
                if doc.unsupported.len() == 1 {
                    "that field is"
                } else {
                    "those fields are"
                }
            ),
        ),
        Some((reason, message)) => condition(ACCEPTED, false, reason, message.clone()),
    };
    let missing = doc.references.iter().find(|s| !service_exists(s));
    let resolved = match (&doc.bad_reference, missing) {
        (Some((reason, message)), _) => condition(RESOLVED_REFS, false, reason, message.clone()),
        (None, None) => condition(RESOLVED_REFS, true, "ResolvedRefs", String::new()),
        (None, Some(s)) => condition(
            RESOLVED_REFS,
            false,
            "BackendNotFound",
            format!(
                "{} names Service {}/{}, which does not exist",
                doc.object, s.namespace, s.name
            ),
        ),
    };
    Verdict {
        object: doc.object.clone(),
        origin: doc.origin.clone(),
        generation: doc.generation,
        conditions: vec![accepted, resolved],
        parents: doc.parents.clone(),
    }
}
