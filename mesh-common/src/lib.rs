//! Types shared by Lacewing's kernel programs (`mesh-ebpf`) and its userspace
//! (`mesh-userspace`): map keys and values, map and program names, constants,
//! and the pure decision logic both sides run (Maglev hashing).
//!
//! Every map type here is `#[repr(C)]`, `Copy`, has explicit padding and a
//! size assertion, so the kernel and userspace agree on the layout byte for
//! byte. The crate is `no_std`; the `alloc` feature adds the userspace-only
//! builders (the Maglev table), and `user` adds `aya::Pod` impls as well.
#![no_std]
#![deny(unsafe_code)]

pub mod capture;
pub mod fastpath;
pub mod lb;
#[cfg(feature = "alloc")]
pub mod maglev;
pub mod names;
pub mod splice;

/// Address family numbers as the kernel reports them in `bpf_sock_addr.family`.
pub mod family {
    /// `AF_INET`.
    pub const INET: u16 = 2;
    /// `AF_INET6`.
    pub const INET6: u16 = 10;
}
