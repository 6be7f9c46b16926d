//! Lacewing's core: what every other crate agrees on, with no sockets, no
//! kernel and no Kubernetes client.
//!
//! - [`api`]: the `lacewing.io/v1alpha1` CRD types and the Gateway API
//!   HTTPRoute subset the mesh reads;
//! - [`model`]: the one internal model of the cluster and its translation
//!   from Kubernetes objects, and the authorization decisions;
//! - [`proto`]: the controller-node protocol, its conversions and the
//!   chunking of large snapshots;
//! - [`pki`]: the CA, certificate requests and SVIDs;
//! - [`trust`]: the trust bundle and the rotation of the CA's root;
//! - [`identity`]: the typed SPIFFE workload identity.
#![forbid(unsafe_code)]

pub mod api;
pub mod duration;
pub mod identity;
pub mod model;
pub mod pki;
pub mod proto;
pub mod trust;
