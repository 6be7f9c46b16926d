//! The Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1) fields Lacewing
//! reads, GAMMA style: a route whose parentRef is a Service applies to
//! traffic to that Service. (The CRD is Gateway API's own, not ours.)

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `HttpRoute` is the typed object the Kubernetes source watches. Its CRD is
/// Gateway API's, so no schema of ours is generated for it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    root = "HttpRoute",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<BackendRef>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// A parent or backend reference; Lacewing follows those of kind Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// `Service` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl BackendRef {
    pub fn is_service(&self) -> bool {
        self.kind.as_deref().is_none_or(|k| k == "Service")
    }
}
