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

/// Where a meshed pod's connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Straight to the destination pod.
    Direct,
    /// Nowhere: policy denies it (ECONNREFUSED at connect).
    Refuse,
    /// Through the daemon's in-pod listener.
    Daemon,
}

/// The connect hook's decision for a meshed pod (identity number
/// `src_identity`, 0 when unknown) connecting to a destination, and the
/// `LW_FAST_STATS` counter it is counted under. The map reads are passed as
/// closures so the kernel looks up only what the decision needs, in this
/// order: is the destination a meshed pod here (`LW_LOCAL_PODS`), the
/// node's switches (`LW_SETTINGS` flags), the pair's verdict
/// (`LW_PAIR_POLICY`).
#[inline(always)]
pub fn decide(
    dest_is_local: impl FnOnce() -> bool,
    settings_flags: impl FnOnce() -> u32,
    src_identity: u32,
    verdict: impl FnOnce() -> Option<u32>,
) -> (Path, u32) {
    use crate::splice::{ACCELERATION, FAST_PATH};
    if !dest_is_local() {
        return (Path::Daemon, TO_DAEMON_NOT_LOCAL);
    }
    let on = ACCELERATION | FAST_PATH;
    if settings_flags() & on != on {
        return (Path::Daemon, TO_DAEMON_SWITCHED_OFF);
    }
    if src_identity == 0 {
        return (Path::Daemon, TO_DAEMON_NO_IDENTITY);
    }
    match verdict() {
        Some(VERDICT_ALLOW) => (Path::Direct, DECIDED_ALLOW),
        Some(VERDICT_DENY) => (Path::Refuse, DECIDED_DENY),
        _ => (Path::Daemon, TO_DAEMON_POLICY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::{ACCELERATION, FAST_PATH};

    const ON: u32 = ACCELERATION | FAST_PATH;

    fn no_lookup<T>() -> T {
        panic!("looked up a map the decision does not need")
    }

    #[test]
    fn a_pair_with_a_verdict_is_decided_in_the_kernel() {
        assert_eq!(
            decide(|| true, || ON, 7, || Some(VERDICT_ALLOW)),
            (Path::Direct, DECIDED_ALLOW)
        );
        assert_eq!(
            decide(|| true, || ON, 7, || Some(VERDICT_DENY)),
            (Path::Refuse, DECIDED_DENY)
        );
        // A pair whose verdict depends on the port (or L7): the daemon.
        assert_eq!(
            decide(|| true, || ON, 7, || None),
            (Path::Daemon, TO_DAEMON_POLICY)
        );
    }

    #[test]
    fn anything_else_goes_to_the_daemon_and_says_why() {
        assert_eq!(
            decide(|| false, no_lookup, 7, no_lookup),
            (Path::Daemon, TO_DAEMON_NOT_LOCAL)
        );
        for flags in [0, ACCELERATION, FAST_PATH] {
            assert_eq!(
                decide(|| true, || flags, 7, no_lookup),
                (Path::Daemon, TO_DAEMON_SWITCHED_OFF),
                "flags {flags}"
            );
        }
        assert_eq!(
            decide(|| true, || ON, 0, no_lookup),
            (Path::Daemon, TO_DAEMON_NO_IDENTITY)
        );
    }
}

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
