//! The host edges Lacewing's daemons share: the system calls the standard
//! library does not wrap ([`os`] and, for descriptors received over a Unix
//! socket, [`handoff`]: the only modules with `unsafe`), sockets the mesh
//! must not capture ([`net`]), listeners handed to a successor ([`handoff`]), the TCP sockets of a network namespace
//! ([`diag`]: listed and closed, as `ss -K` does), cgroup v2 and bpffs paths, signals,
//! logging, the plain HTTP endpoint for metrics and health ([`http`]), and
//! what every listening port lets one peer hold ([`admission`]), and the
//! worker threads that carry connections ([`workers`]).
#![deny(unsafe_code)]

pub mod admission;
pub mod bpffs;
pub mod cgroup;
pub mod diag;
pub mod handoff;
pub mod http;
pub mod net;
pub mod os;
pub mod shutdown;
pub mod telemetry;
pub mod workers;
