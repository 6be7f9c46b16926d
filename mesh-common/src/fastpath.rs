//! The same-node fast path: a meshed pod's connect to a meshed pod on the
//! same node goes straight to it, with no daemon hop, when the node's L4
//! policy alone decides the pair; the connection is then exactly the
//! no-mesh path (not spliced: see `splice` for why only writes toward the
//! daemon are). The connect hook decides from two maps the daemon keeps:
//! the meshed pods here by address (`LW_LOCAL_PODS`, with their identity's
//! number) and the verdict for each (source identity, destination pod)
//! pair that does not depend on the port or on L7 (`LW_PAIR_POLICY`). No
//! verdict means the daemon decides, as for any other connection.

use crate::capture::AddrKey;

/// A meshed pod on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalPod {
    /// Its workload identity's number (never 0).
    pub identity: u32,
    pub _pad: u32,
}

/// A source identity's connections to a pod here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub dest: AddrKey,
    pub src_identity: u32,
}

/// `LW_PAIR_POLICY` values.
pub const VERDICT_ALLOW: u32 = 1;
pub const VERDICT_DENY: u32 = 2;

/// `LW_FAST_STATS` indexes: what the connect hook decided for meshed pods'
/// connections, and why.
pub const DECIDED_ALLOW: u32 = 0;
pub const DECIDED_DENY: u32 = 1;
pub const TO_DAEMON_NOT_LOCAL: u32 = 2;
pub const TO_DAEMON_POLICY: u32 = 3;
pub const TO_DAEMON_SWITCHED_OFF: u32 = 4;
pub const TO_DAEMON_NO_IDENTITY: u32 = 5;
pub const STATS: u32 = 6;

/// Every counter with its `path` and `reason` labels.
pub const STAT_NAMES: [(u32, &str, &str); 6] = [
    (DECIDED_ALLOW, "kernel", "allowed"),
    (DECIDED_DENY, "kernel", "denied"),
    (TO_DAEMON_NOT_LOCAL, "daemon", "destination_not_meshed_here"),
    (TO_DAEMON_POLICY, "daemon", "policy_needs_daemon"),
    (TO_DAEMON_SWITCHED_OFF, "daemon", "fast_path_off"),
    (TO_DAEMON_NO_IDENTITY, "daemon", "source_identity_unknown"),
];

const _: () = assert!(size_of::<LocalPod>() == 8);
const _: () = assert!(size_of::<PairKey>() == 24);

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    // SAFETY: plain `#[repr(C)]` data with explicit padding, no pointers;
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::LocalPod {}
    unsafe impl aya::Pod for super::PairKey {}
}
