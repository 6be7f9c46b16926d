//! Every map the kernel programs use, declared once.
//!
//! BTF-defined (`#[btf_map]`) so `bpftool map dump` prints keys and values with
//! their field names. Static names match `mesh_common::names`.

use aya_ebpf::{btf_maps::PerCpuHashMap, macros::btf_map};
use mesh_common::conn::{ConnCount, ConnKey};

/// Distinct (port, family, protocol) keys counted before new ones are dropped.
const CONN_BY_PORT_ENTRIES: usize = 4096;

/// `mesh_common::names::MAP_CONN_BY_PORT`: connect() calls per destination.
#[btf_map]
pub static LW_CONN_BY_PORT: PerCpuHashMap<ConnKey, ConnCount, CONN_BY_PORT_ENTRIES> =
    PerCpuHashMap::new();
