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

// The userspace side of a splice key: the daemon names the writer at the
// other end of one of its sockets with exactly the key the kernel gave it.
use core::net::{IpAddr, SocketAddr};

/// The key the kernel gives the writer at the other end of the daemon's
/// socket (`local`, `peer` as the daemon sees them). Loopback hops carry
/// the namespace's cookie (`netns`).
pub fn writer_key(local: SocketAddr, peer: SocketAddr, netns: u64) -> SpliceKey {
    let ((fam, writer), (_, daemon)) = (addr_words(peer.ip()), addr_words(local.ip()));
    SpliceKey {
        netns_cookie: if peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback() {
            netns
        } else {
            0
        },
        local: writer,
        remote: daemon,
        local_port: peer.port(),
        remote_port: local.port(),
        family: fam as u8,
        _pad: [0; 3],
    }
}

/// An address as the kernel's context words (network order, read natively),
/// IPv4-mapped IPv6 as IPv4.
pub fn addr_words(ip: IpAddr) -> (u16, [u32; 4]) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (
            crate::family::INET,
            [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        ),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (crate::family::INET6, [w(0), w(4), w(8), w(12)])
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

#[cfg(test)]
mod writer_key_tests {
    use super::*;

    #[test]
    fn writer_keys_match_what_the_kernel_sees() {
        // The daemon's in-pod socket: 127.0.0.1:15001, peer 127.0.0.1:40000.
        let k = writer_key(
            "127.0.0.1:15001".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
            77,
        );
        assert_eq!(k.netns_cookie, 77);
        assert_eq!(k.local[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!((k.local_port, k.remote_port), (40000, 15001));
        assert_eq!(k.family, crate::family::INET as u8);
        // A delivery: node 10.244.1.1:50000 to pod 10.244.1.10:9000.
        let k = writer_key(
            "10.244.1.1:50000".parse().unwrap(),
            "10.244.1.10:9000".parse().unwrap(),
            77,
        );
        assert_eq!(k.netns_cookie, 0, "not a loopback hop");
        assert_eq!(k.local[0].to_ne_bytes(), [10, 244, 1, 10]);
        assert_eq!(k.remote[0].to_ne_bytes(), [10, 244, 1, 1]);
        // IPv4-mapped peers are keyed as IPv4, as the kernel program does.
        let mapped = writer_key(
            "[::ffff:10.244.1.1]:50000".parse().unwrap(),
            "[::ffff:10.244.1.10]:9000".parse().unwrap(),
            0,
        );
        assert_eq!(mapped, k);
    }
}
