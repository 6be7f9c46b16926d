//! SPIFFE identities, typed: a workload's
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` and a node's
//! `spiffe://<trust-domain>/lacewing/node/<node>`. Parsed once where they
//! enter (a certificate, a policy, a CSR) and compared as values after that,
//! instead of strings split where they are used.

use std::{fmt, str::FromStr};

/// The trust domain when MeshConfig sets none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A SPIFFE identity the mesh issues.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A workload: a service account in a namespace.
    Workload {
        trust_domain: String,
        namespace: String,
        service_account: String,
    },
    /// A node daemon.
    Node { trust_domain: String, node: String },
}

/// Why a string is not an identity the mesh issues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    NotSpiffe(String),
    #[error(
        "{0:?} is not a mesh identity: use spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
}

impl Identity {
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self::Workload {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    pub fn node(trust_domain: &str, node: &str) -> Self {
        Self::Node {
            trust_domain: trust_domain.to_owned(),
            node: node.to_owned(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        match self {
            Self::Workload { trust_domain, .. } | Self::Node { trust_domain, .. } => trust_domain,
        }
    }

    /// The workload's namespace; `None` for a node.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Self::Workload { namespace, .. } => Some(namespace),
            Self::Node { .. } => None,
        }
    }

    /// The node's name; `None` for a workload.
    pub fn node_name(&self) -> Option<&str> {
        match self {
            Self::Node { node, .. } => Some(node),
            Self::Workload { .. } => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workload {
                trust_domain,
                namespace,
                service_account,
            } => write!(
                f,
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
            ),
            Self::Node { trust_domain, node } => {
                write!(f, "spiffe://{trust_domain}/lacewing/node/{node}")
            }
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let nonempty = |p: &[&str]| p.iter().all(|x| !x.is_empty());
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if nonempty(&[td, ns, sa]) => Ok(Self::workload(td, ns, sa)),
            [td, "lacewing", "node", node] if nonempty(&[td, node]) => Ok(Self::node(td, node)),
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_round_trips() {
        let text = "spiffe://cluster.local/ns/shop/sa/web";
        let id: Identity = text.parse().unwrap();
        assert_eq!(id, Identity::workload("cluster.local", "shop", "web"));
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.to_string(), text);
    }

    #[test]
    fn node_round_trips() {
        let text = "spiffe://example.org/lacewing/node/n1";
        let id: Identity = text.parse().unwrap();
        assert_eq!(id.node_name(), Some("n1"));
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.to_string(), text);
    }

    #[test]
    fn rejects_what_the_mesh_does_not_issue() {
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} parsed");
        }
        assert!(matches!(
            "http://x".parse::<Identity>(),
            Err(IdentityError::NotSpiffe(_))
        ));
    }
}
