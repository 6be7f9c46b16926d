//! Service load balancing: keys and values of the service, backend, slot,
//! Maglev, affinity, reverse-translation and statistics maps.
//!
//! Addresses are 16 bytes in network order; an IPv4 address fills the first 4
//! and leaves the rest zero, with `family` telling which. Ports are host order.

use crate::family;

/// `Service.algorithm`: pick a slot at random; slots repeat a backend as often
/// as its weight, so the pick is weighted.
pub const ALG_RANDOM: u32 = 0;
/// `Service.algorithm`: Maglev consistent hashing over a table of prime size.
pub const ALG_MAGLEV: u32 = 1;

/// Default Maglev table size (prime, as Cilium's default).
pub const MAGLEV_DEFAULT_SIZE: u32 = 16381;

/// Slots a random-algorithm service keeps in its own [`Service`] value: up
/// to this many, a connect finds its backend id in the entry it already
/// read, with no slot table to look up. A power of two, so the kernel can
/// bound the index with a mask.
pub const INLINE_SLOTS: usize = 16;

/// Whether a service of `algorithm` with `count` slots keeps them inline
/// ([`Service::slots`]) rather than in a slot table of its own.
#[inline(always)]
pub const fn inline_slots(algorithm: u32, count: u32) -> bool {
    algorithm == ALG_RANDOM && count as usize <= INLINE_SLOTS
}

/// IP protocol numbers, as in `bpf_sock_addr.protocol`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A service frontend: ClusterIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// `AF_INET` (2) or `AF_INET6` (10), as a byte.
    pub family: u8,
}

/// What the kernel needs to pick a backend for a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// This service's id (key of slots, stats and affinity).
    pub id: u32,
    /// Number of slots in the current generation; 0 means no ready backend:
    /// connects are refused.
    pub count: u32,
    /// Which of the two slot generations is live (0 or 1). Updates write the
    /// other one, then flip this, then delete the old slots.
    pub generation: u32,
    /// [`ALG_RANDOM`] or [`ALG_MAGLEV`].
    pub algorithm: u32,
    /// ClientIP session affinity timeout in seconds; 0 disables affinity.
    pub affinity_timeout_s: u32,
    /// [`SVC_L7`], or 0.
    pub flags: u32,
    /// The backend ids of a random-algorithm service of at most
    /// [`INLINE_SLOTS`] slots ([`inline_slots`]); zero otherwise. Written
    /// with the rest of the value, so a generation switch stays one update.
    pub slots: [u32; INLINE_SLOTS],
}

/// `Service.flags`: HTTP routes apply to this frontend. A meshed pod's
/// connect is not balanced: it is captured with the frontend itself as the
/// original destination, and the node daemon picks a backend per request.
/// Other clients are balanced as usual.
pub const SVC_L7: u32 = 1;

/// One generation of a service's slot table: the key of the outer maps
/// (hash of maps) whose inner maps are arrays of [`Slot`], one array per
/// service generation, sized to its table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableKey {
    pub svc_id: u32,
    pub generation: u32,
}

/// The backend a slot points to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub backend_id: u32,
}

/// A backend. Backend ids belong to one service, so a backend that exists is a
/// member of its service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// Relative weight (slots per backend for the random algorithm).
    pub weight: u16,
    /// The service this backend belongs to.
    pub svc_id: u32,
}

/// Session affinity: the client (its network namespace, which is one pod) and
/// the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub svc_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last connect that used it.
    pub last_used_ns: u64,
}

/// Reverse translation: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub socket_cookie: u64,
    /// Backend address, network order.
    pub addr: [u8; 16],
    /// Backend port, host order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// The service address to show instead of the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A TCP socket's translation, kept in the socket's own storage (freed by
/// the kernel with the socket): the backend it was sent to and the service
/// address getpeername shows instead. For a captured socket, `backend` is
/// the daemon's listener and `captured` where the connection was going,
/// which sock_ops hands to the daemon (`MAP_CAPTURED`) once established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    pub backend: [u8; 16],
    pub service: [u8; 16],
    /// Network order, IPv4 in the first 4 bytes; meaningful only when
    /// `captured_family` is not 0.
    pub captured: [u8; 16],
    pub backend_port: u16,
    pub service_port: u16,
    pub captured_port: u16,
    pub family: u8,
    /// 0 for a socket that was translated, not captured.
    pub captured_family: u8,
}

const _: () = assert!(size_of::<SockRevNat>() == 56);

/// The data of a service CIDR key (in an LPM trie, `prefix_len` = 32 + the
/// CIDR's length, so the family byte and padding always match exactly).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKey {
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}

/// Bits of [`CidrKey`] before the address.
pub const CIDR_KEY_HEADER_BITS: u32 = 32;

/// What a service CIDR entry says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCidr {
    /// Reserved; 0.
    pub flags: u32,
}

/// The stats id of connects refused because they went to an address in a
/// service CIDR that is no service (a deleted or never allocated ClusterIP).
pub const UNALLOCATED_SVC_ID: u32 = 0;

/// Per-CPU counters of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    /// Connects (and unconnected UDP sends) sent to a backend.
    pub connects: u64,
    /// Connects refused because the service had no ready backend.
    pub refused: u64,
}

#[cfg(test)]
mod maglev_flow_tests {
    use super::maglev_flow;

    #[test]
    fn a_bound_source_is_the_flow_whatever_the_socket() {
        let src = [u32::from_ne_bytes([10, 244, 0, 5]), 0, 0, 0];
        assert_eq!(maglev_flow(src, 40_000, 1), maglev_flow(src, 40_000, 99));
        assert_ne!(maglev_flow(src, 40_000, 1), maglev_flow(src, 40_001, 1));
        let other = [u32::from_ne_bytes([10, 244, 0, 6]), 0, 0, 0];
        assert_ne!(maglev_flow(src, 40_000, 1), maglev_flow(other, 40_000, 1));
    }

    #[test]
    fn an_unbound_socket_is_its_own_flow() {
        assert_eq!(maglev_flow([0; 4], 0, 7), 7);
        assert_ne!(maglev_flow([0; 4], 0, 7), maglev_flow([0; 4], 0, 8));
    }
}

const _: () = assert!(size_of::<SvcKey>() == 20);
const _: () = assert!(size_of::<Service>() == 24 + 4 * INLINE_SLOTS);
const _: () = assert!(INLINE_SLOTS.is_power_of_two());
const _: () = assert!(size_of::<TableKey>() == 8);
const _: () = assert!(size_of::<Slot>() == 4);
const _: () = assert!(size_of::<Backend>() == 24);
const _: () = assert!(size_of::<AffinityKey>() == 16);
const _: () = assert!(size_of::<Affinity>() == 16);
const _: () = assert!(size_of::<RevNatKey>() == 32);
const _: () = assert!(size_of::<RevNat>() == 24);
const _: () = assert!(size_of::<SvcStats>() == 16);
const _: () = assert!(size_of::<CidrKey>() == 20);
const _: () = assert!(size_of::<SvcCidr>() == 4);

/// 64-bit finalizer (SplitMix64): spreads any input evenly over all bits. Used
/// for Maglev flow hashing in the kernel and in userspace alike.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The flow a Maglev service hashes for a socket. A socket bound to a source
/// port before it connects (or sends) is the flow (source address, source
/// port): the same flow reaches the same backend from any socket, and keeps
/// it while that backend stays. An unbound socket has no port yet when
/// connect() runs, so it is a flow of its own (its cookie). `src` is the
/// bound address as the kernel's context words (IPv4 in the first).
#[inline(always)]
pub const fn maglev_flow(src: [u32; 4], src_port: u32, socket_cookie: u64) -> u64 {
    if src_port == 0 {
        return socket_cookie;
    }
    let addr = mix64(((src[0] as u64) << 32) | src[1] as u64)
        ^ mix64(((src[2] as u64) << 32) | src[3] as u64);
    // The top bit keeps tuple flows apart from cookies (which count up from 1).
    mix64(addr ^ src_port as u64) | (1 << 63)
}

/// The Maglev table index of a flow: the same in kernel and userspace.
#[inline(always)]
pub const fn maglev_index(flow: u64, svc_id: u32, table_size: u32) -> u32 {
    if table_size == 0 {
        return 0;
    }
    (mix64(flow ^ ((svc_id as u64) << 32)) % table_size as u64) as u32
}

impl SvcKey {
    pub const fn v4(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: [
                addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            port,
            proto,
            family: family::INET as u8,
        }
    }
    pub const fn v6(addr: [u8; 16], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            family: family::INET6 as u8,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `repr(C)`, `Copy`, made only of integers and byte
    // arrays with explicit padding fields, so any byte pattern is valid.
    macro_rules! pod {
        ($($t:ty),*) => { $( #[allow(unsafe_code)] unsafe impl aya::Pod for $t {} )* };
    }
    pod!(
        super::SvcKey,
        super::Service,
        super::TableKey,
        super::Slot,
        super::Backend,
        super::AffinityKey,
        super::Affinity,
        super::RevNatKey,
        super::RevNat,
        super::SvcStats,
        super::CidrKey,
        super::SvcCidr
    );
}
