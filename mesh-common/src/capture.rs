//! Capture of meshed pods' outbound TCP: the connect hook sends a meshed
//! pod's connection to the node daemon's listener inside that pod's network
//! namespace (127.0.0.1:15001 or [::1]:15001) and records where it was
//! going; sock_ops moves the record from the socket's cookie to the key the
//! daemon can see from its accepted socket (the pod's netns and the client's
//! local port).

/// The daemon's outbound listener port inside each meshed pod.
pub const OUTBOUND_PORT: u16 = 15001;

/// A meshed pod's network namespace (`LW_MESHED_NETNS`, by netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshedNetns {
    /// Bit 0: capture outbound TCP.
    pub flags: u32,
    /// The pod's workload identity, as numbered by the daemon for the
    /// same-node fast path (`fastpath::PairKey`); 0 when not numbered.
    pub identity: u32,
}

pub const CAPTURE_OUTBOUND: u32 = 1;

/// Where a captured connection was going (after load balancing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// A captured connection as the daemon sees it from its accepted socket:
/// the pod's netns and the client's local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CapturedKey {
    pub netns_cookie: u64,
    /// Host order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// The daemon's inbound plain-text listener port inside each STRICT pod:
/// plain connections to the pod are steered there (sk_lookup) and reset.
pub const INBOUND_PORT: u16 = 15006;

/// An address (`LW_INBOUND`: a STRICT pod's address; `LW_NODE_ADDRS`: an
/// address of the node, whose connections to pods are never steered).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// Network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<AddrKey>() == 20);
const _: () = assert!(size_of::<MeshedNetns>() == 8);
const _: () = assert!(size_of::<OrigDst>() == 24);
const _: () = assert!(size_of::<CapturedKey>() == 16);

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    // SAFETY: plain `#[repr(C)]` data with explicit padding, no pointers;
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::MeshedNetns {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::CapturedKey {}
    unsafe impl aya::Pod for super::AddrKey {}
}
