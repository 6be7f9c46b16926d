//! `lacewing-cni`: a chained CNI plugin. The container runtime runs it after
//! the primary CNI plugin has wired a pod; it tells the node daemon which
//! pod started in which network namespace (so the daemon captures its
//! traffic before the pod's first connection), passes the primary's result
//! on unchanged, and tells the daemon when the pod is gone.
//!
//! - [`plugin`]: the CNI calling convention (environment, stdin, answers);
//! - [`handover`]: the request and answer exchanged with the node daemon,
//!   which the daemon's side shares;
//! - [`conflist`]: chaining the plugin into the node's primary
//!   configuration, and taking it out again;
//! - [`install`]: the chart's install step around it (the binary, the
//!   watch, the removal when the last installer on the node stops).
//!
//! The binary links no async runtime: the runtime starts it once per pod
//! and call.

pub mod conflist;
pub mod handover;
pub mod install;
pub mod plugin;
