//! `MeshConfig`: the trust domain and the default mutual-TLS mode, with
//! per-namespace overrides. One per cluster (cluster-scoped).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::PolicyStatus;

#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lacewing.io",
    version = "v1alpha1",
    kind = "MeshConfig",
    status = "PolicyStatus",
    shortname = "meshcfg"
)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// `cluster.local` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub mtls_mode: MtlsMode,
    /// Access logs (one JSON line per connection and per request, from the
    /// node daemons) for meshed pods of every namespace; off by default. A
    /// node's `--access-log` logs everything it carries regardless.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_logging: bool,
    /// Per-namespace overrides of `mtlsMode` and `accessLogging`.
    #[serde(default)]
    pub namespaces: Vec<NamespaceMtls>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Meshed workloads accept only mutual TLS.
    #[default]
    Strict,
    /// Meshed workloads also accept plain text.
    Permissive,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceMtls {
    pub namespace: String,
    /// The mesh-wide `mtlsMode` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<MtlsMode>,
    /// The mesh-wide `accessLogging` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_logging: Option<bool>,
}
