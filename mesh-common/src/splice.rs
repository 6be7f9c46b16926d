//! Same-node acceleration: writes toward the node daemon on a local hop
//! skip the TCP/IP stack. When a connection is established, the sock_ops
//! program puts the app's (or pod's) socket in `LW_SPLICE` and the
//! daemon's socket in `LW_SPLICE_TO`; an sk_msg program on `LW_SPLICE` moves
//! each write straight into the daemon socket's receive queue. The kernel
//! drops entries when their sockets close.
//!
//! Local hops, each found at establishment (never later: a socket added
//! after bytes flowed could reorder them):
//! - the capture leg: a meshed pod's app and the daemon's in-pod listener
//!   (loopback, port 15001, in the pod's network namespace);
//! - the delivery leg: the daemon's connection to a pod on this node (its
//!   socket carries [`crate::names::DELIVERY_MARK`]) and the pod's end of it.
//!
//! Only writes toward the daemon are moved. A moved write is queued at the
//! receiver with no TCP window to stop the writer, so only a receiver that
//! can tell the writer to stop may take them: the daemon, which switches a
//! writer off (`LW_SPLICE_OFF`) when it falls behind. Writes to apps go
//! the usual way, bounded by TCP.
//!
//! A writer that has written the usual way once (its peer not in the map
//! yet, acceleration switched off, or switched off by the daemon) stays
//! off for good: the daemon reads moved bytes first, so mixing the two
//! later would reorder them.

/// A socket of a local hop, by its own view of the connection. The peer's
/// key is the same with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SpliceKey {
    /// The network namespace's cookie for loopback hops (127.0.0.1 exists in
    /// every pod); 0 otherwise (pod and node addresses are unique here).
    pub netns_cookie: u64,
    /// Network order, as the kernel gives them; IPv4 (and IPv4-mapped IPv6)
    /// in the first word.
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// Host order.
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

impl SpliceKey {
    /// The key of the socket at the other end.
    pub const fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad: [0; 3],
        }
    }
}

/// `LW_SETTINGS` index of the node's switches ([`Settings`]).
pub const SETTINGS_INDEX: u32 = 0;

/// Node-wide switches the kernel programs read on every decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Bit 0 ([`ACCELERATION`]): splice local hops.
    pub flags: u32,
    pub _pad: u32,
}

pub const ACCELERATION: u32 = 1;
/// Bit 1: the kernel fast path (with [`ACCELERATION`]): meshed pod to meshed
/// pod on this node with no daemon hop, when L4 policy alone decides.
pub const FAST_PATH: u32 = 2;

/// `LW_SPLICE_STATS` indexes (per-CPU counters of sockets added).
pub const STAT_CAPTURE_LEG: u32 = 0;
pub const STAT_DELIVERY_LEG: u32 = 1;
/// Sockets that qualified but the map refused (full).
pub const STAT_MAP_FULL: u32 = 2;
pub const STATS: u32 = 3;

/// Every counter with the `leg` label it is exported under.
pub const STAT_NAMES: [(u32, &str); 3] = [
    (STAT_CAPTURE_LEG, "capture"),
    (STAT_DELIVERY_LEG, "delivery"),
    (STAT_MAP_FULL, "map_full"),
];

const _: () = assert!(size_of::<SpliceKey>() == 48);
const _: () = assert!(size_of::<Settings>() == 8);

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    // SAFETY: plain `#[repr(C)]` data with explicit padding, no pointers;
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::SpliceKey {}
    unsafe impl aya::Pod for super::Settings {}
}
