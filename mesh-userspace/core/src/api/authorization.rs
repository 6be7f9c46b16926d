//! `AuthorizationPolicy`: L4 and L7 allow/deny by identity, namespace, port,
//! method, path and header. Deny wins; with no policy selecting a workload,
//! everything is allowed.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::PolicyStatus;

#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lacewing.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "authz",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads (pods) of the policy's namespace it applies to; all of them
    /// when empty.
    #[serde(default)]
    pub selector: WorkloadSelector,
    pub action: Action,
    /// A request matches when any rule matches; no rules match nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    Allow,
    Deny,
}

/// All of `from`, `to` and `when` must match (each empty list matches all).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Operation>,
    #[serde(default)]
    pub when: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// SPIFFE identities, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, or `*`.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<u16>,
    /// L7: HTTP methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// L7: exact paths, or prefixes ending in `*`.
    #[serde(default)]
    pub paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    pub header: String,
    pub values: Vec<String>,
}

/// A principal that is not a SPIFFE workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("principal `{0}` must start with spiffe://")]
    NotSpiffe(String),
    #[error("principal `{0}` is not spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>")]
    NotWorkload(String),
}

/// Why a principal is not a SPIFFE workload identity, if it is not one.
pub fn check_principal(principal: &str) -> Result<(), PrincipalError> {
    use crate::identity::{Identity, IdentityError};
    if principal == "*" {
        return Ok(());
    }
    match principal.parse::<Identity>() {
        Ok(Identity::Workload { .. }) => Ok(()),
        Err(IdentityError::NotSpiffe(_)) => Err(PrincipalError::NotSpiffe(principal.to_owned())),
        Ok(Identity::Node { .. }) | Err(IdentityError::Shape(_)) => {
            Err(PrincipalError::NotWorkload(principal.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_are_spiffe_workload_identities() {
        assert!(check_principal("spiffe://cluster.local/ns/shop/sa/web").is_ok());
        assert!(check_principal("*").is_ok());
        let err = check_principal("spiffe://cluster.local/ns/shop").unwrap_err();
        assert_eq!(
            err.to_string(),
            "principal `spiffe://cluster.local/ns/shop` is not spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>"
        );
        assert_eq!(
            check_principal("web"),
            Err(PrincipalError::NotSpiffe("web".to_owned()))
        );
    }
}
