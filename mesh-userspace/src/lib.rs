//! Lacewing's userspace: the per-node daemon (`lacewing-node`), the controller
//! (`lacewing-controller`), the CLI (`lacewing`), and the local lab that runs a
//! whole cluster in network namespaces on one Linux machine.
//!
//! The binaries in `src/bin/` stay thin; the logic lives in these modules.
#![deny(unsafe_code)]

pub mod api;
pub mod bench;
pub mod bpffs;
pub mod cgroup;
pub mod cli;
pub mod controller;
pub mod http;
pub mod lab;
pub mod model;
pub mod net;
pub mod node;
pub mod pki;
pub mod proto;
pub mod shutdown;
pub mod sys;
pub mod telemetry;
pub mod tunnel;
