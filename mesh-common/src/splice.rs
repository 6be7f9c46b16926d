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

impl SpliceKey {
    /// The key of a socket from the tuple fields sock_ops and sk_msg
    /// contexts share (`family`, `local_ip4`, `remote_ip4`, `local_ip6`,
    /// `remote_ip6`, `local_port` in host order, `remote_port` in network
    /// order in the upper 16 bits), without the netns cookie. IPv4-mapped
    /// IPv6 is keyed as IPv4, so a dual-stack socket finds a plain IPv4
    /// peer. The kernel programs and the daemon both key sockets with this.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn from_context(
        fam: u32,
        local4: u32,
        remote4: u32,
        local6: [u32; 4],
        remote6: [u32; 4],
        local_port: u32,
        remote_port_be: u32,
    ) -> Self {
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        let (fam, local, remote) = if fam == u32::from(crate::family::INET) {
            (crate::family::INET, [local4, 0, 0, 0], [remote4, 0, 0, 0])
        } else if local6[0] == 0 && local6[1] == 0 && local6[2] == mapped {
            (
                crate::family::INET,
                [local6[3], 0, 0, 0],
                [remote6[3], 0, 0, 0],
            )
        } else {
            (crate::family::INET6, local6, remote6)
        };
        Self {
            netns_cookie: 0,
            local,
            remote,
            local_port: local_port as u16,
            // Both contexts give the remote port in network order in the
            // upper 16 bits (the kernel shifts it there on little-endian).
            remote_port: u16::from_be((remote_port_be >> 16) as u16),
            family: fam as u8,
            _pad: [0; 3],
        }
    }

    /// Whether the peer is a loopback address (127/8, ::1): such a hop is
    /// inside one pod, and 127.0.0.1 exists in every pod, so its key needs
    /// the namespace's cookie.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        if self.family == crate::family::INET as u8 {
            self.remote[0].to_ne_bytes()[0] == 127
        } else {
            self.remote[0] == 0
                && self.remote[1] == 0
                && self.remote[2] == 0
                && self.remote[3] == u32::from_ne_bytes([0, 0, 0, 1])
        }
    }
}

// The daemon's side of a splice key: it names the writer at the other end
// of one of its sockets with exactly the key the kernel gave that writer.
use core::net::{IpAddr, SocketAddr};

/// The key the kernel gives the writer at the other end of the daemon's
/// socket (`local`, `peer` as the daemon sees them): the fields the
/// writer's sock_ops context would show, through
/// [`SpliceKey::from_context`]. Loopback hops carry the namespace's cookie
/// (`netns`).
pub fn writer_key(local: SocketAddr, peer: SocketAddr, netns: u64) -> SpliceKey {
    let (fam4, writer4, writer6) = context_words(peer.ip());
    let (_, daemon4, daemon6) = context_words(local.ip());
    let mut key = SpliceKey::from_context(
        fam4,
        writer4,
        daemon4,
        writer6,
        daemon6,
        u32::from(peer.port()),
        u32::from(local.port().to_be()) << 16,
    );
    if key.is_loopback() {
        key.netns_cookie = netns;
    }
    key
}

/// An address as a context shows it: the family, the IPv4 word and the
/// IPv6 words (network order, read natively).
fn context_words(ip: IpAddr) -> (u32, u32, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (
            u32::from(crate::family::INET),
            u32::from_ne_bytes(v4.octets()),
            [0; 4],
        ),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (
                u32::from(crate::family::INET6),
                0,
                [w(0), w(4), w(8), w(12)],
            )
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

    /// The key the kernel gives the daemon's own socket (local = the
    /// daemon's end), from the words its sock_ops context shows.
    fn daemon_socket_key(local: SocketAddr, peer: SocketAddr) -> SpliceKey {
        let (fam, l4, l6) = context_words(local.ip());
        let (_, r4, r6) = context_words(peer.ip());
        SpliceKey::from_context(
            fam,
            l4,
            r4,
            l6,
            r6,
            u32::from(local.port()),
            u32::from(peer.port().to_be()) << 16,
        )
    }

    /// sk_msg finds the daemon's socket in `LW_SPLICE_TO` under the writer's
    /// key's `peer()`: the daemon's name for the writer must be exactly the
    /// peer of the key the kernel gave the daemon's socket.
    #[test]
    fn the_daemons_writer_key_is_the_peer_of_its_own_socket_key() {
        for (local, peer, loopback) in [
            // The capture leg: the in-pod listener and the app.
            ("127.0.0.1:15001", "127.0.0.1:40000", true),
            ("[::1]:15001", "[::1]:40000", true),
            // The delivery leg: the daemon (node address) and a pod.
            ("10.244.1.1:50000", "10.244.1.10:9000", false),
            ("[fd00:244:1::1]:50000", "[fd00:244:1::10]:9000", false),
        ] {
            let (local, peer) = (local.parse().unwrap(), peer.parse().unwrap());
            let mut expected = daemon_socket_key(local, peer).peer();
            if loopback {
                expected.netns_cookie = 77;
            }
            assert_eq!(writer_key(local, peer, 77), expected, "{local} <- {peer}");
            assert_eq!(writer_key(local, peer, 77).is_loopback(), loopback);
        }
    }

    #[test]
    fn ipv4_mapped_sockets_are_keyed_as_ipv4() {
        let plain = writer_key(
            "10.244.1.1:50000".parse().unwrap(),
            "10.244.1.10:9000".parse().unwrap(),
            0,
        );
        let mapped = writer_key(
            "[::ffff:10.244.1.1]:50000".parse().unwrap(),
            "[::ffff:10.244.1.10]:9000".parse().unwrap(),
            0,
        );
        assert_eq!(mapped, plain);
        assert_eq!(plain.family, crate::family::INET as u8);
        assert_eq!((plain.local_port, plain.remote_port), (9000, 50000));
    }
}
