//! Connection counting: the key and value of [`MAP_CONN_BY_PORT`](crate::names::MAP_CONN_BY_PORT).

/// Key of the per-port connection counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// Address family: [`family::INET`](crate::family::INET) or
    /// [`family::INET6`](crate::family::INET6).
    pub family: u16,
    /// IP protocol number (6 TCP, 17 UDP), as in `bpf_sock_addr.protocol`.
    pub protocol: u8,
    /// Explicit padding; always zero so equal keys hash equally.
    pub _pad: [u8; 3],
}

impl ConnKey {
    /// Builds a key with its padding zeroed.
    pub const fn new(dst_port: u16, family: u16, protocol: u8) -> Self {
        Self {
            dst_port,
            family,
            protocol,
            _pad: [0; 3],
        }
    }
}

/// Value of the per-port connection counter (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCount {
    /// connect() calls seen on this CPU for the key.
    pub connects: u64,
}

const _: () = assert!(size_of::<ConnKey>() == 8);
const _: () = assert!(size_of::<ConnCount>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are `repr(C)`, `Copy`, made only of integers, and have no
    // implicit padding (explicit `_pad`), so any byte pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ConnKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ConnCount {}
}
