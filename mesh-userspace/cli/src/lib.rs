//! `lacewing`, the command line, and what it runs: the local lab (a whole
//! cluster in network namespaces on one Linux machine, the embedded default
//! and the test bed), the demo, status, maps, manifests and the benchmarks.
//!
//! The binary in `src/bin/` stays thin; the logic lives in these modules.
#![deny(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod lab;
