//! Reading and writing the destination in a `bpf_sock_addr` context.

use aya_ebpf::programs::SockAddrContext;
use mesh_common::family;

/// An address and port: 16 bytes in network order (IPv4 in the first 4),
/// port in host order.
#[derive(Clone, Copy)]
pub struct Dest {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
}

// The context's fields must be read and written as whole 4-byte words, one at
// a time: the verifier rewrites each access into the kernel's sockaddr.

#[inline(always)]
pub fn read4(ctx: &SockAddrContext) -> Dest {
    // SAFETY: plain 4-byte context loads on the program's own context.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip.to_ne_bytes());
    Dest {
        addr,
        // The port sits in network order in the low 16 bits.
        port: u16::from_be(port as u16),
        family: family::INET as u8,
    }
}

#[inline(always)]
pub fn read6(ctx: &SockAddrContext) -> Dest {
    // SAFETY: plain 4-byte context loads on the program's own context.
    let (w0, w1, w2, w3, port) = unsafe {
        let sa = ctx.sock_addr;
        (
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
            (*sa).user_port,
        )
    };
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&w0.to_ne_bytes());
    addr[4..8].copy_from_slice(&w1.to_ne_bytes());
    addr[8..12].copy_from_slice(&w2.to_ne_bytes());
    addr[12..16].copy_from_slice(&w3.to_ne_bytes());
    Dest {
        addr,
        port: u16::from_be(port as u16),
        family: family::INET6 as u8,
    }
}

/// `read6`, with an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack
/// socket dialling IPv4, as gRPC's C core and Java do) read as the IPv4
/// address it maps: services, pods and policies are keyed by IPv4, and a
/// mapped address must meet the same load balancing and capture.
#[inline(always)]
pub fn read6_unmapped(ctx: &SockAddrContext) -> Dest {
    let dest = read6(ctx);
    let a = &dest.addr;
    if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&a[12..16]);
        Dest {
            addr,
            port: dest.port,
            family: family::INET as u8,
        }
    } else {
        dest
    }
}

/// `write6`, with an IPv4 destination written IPv4-mapped (the socket is
/// IPv6; [`read6_unmapped`] read its address as IPv4).
#[inline(always)]
pub fn write6_mapped(ctx: &SockAddrContext, to: &Dest) {
    if to.family == family::INET as u8 {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(&to.addr[..4]);
        write6(
            ctx,
            &Dest {
                addr,
                port: to.port,
                family: family::INET6 as u8,
            },
        );
    } else {
        write6(ctx, to);
    }
}

#[inline(always)]
pub fn write4(ctx: &SockAddrContext, to: &Dest) {
    let ip = u32::from_ne_bytes([to.addr[0], to.addr[1], to.addr[2], to.addr[3]]);
    // SAFETY: plain 4-byte context stores the verifier allows for these hooks.
    unsafe {
        (*ctx.sock_addr).user_ip4 = ip;
        (*ctx.sock_addr).user_port = u32::from(to.port.to_be());
    }
}

#[inline(always)]
pub fn write6(ctx: &SockAddrContext, to: &Dest) {
    let a = &to.addr;
    // SAFETY: plain 4-byte context stores the verifier allows for these hooks.
    unsafe {
        let sa = ctx.sock_addr;
        (*sa).user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        (*sa).user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        (*sa).user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        (*sa).user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        (*sa).user_port = u32::from(to.port.to_be());
    }
}

/// The socket's IP protocol (6 TCP, 17 UDP).
#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: plain 4-byte context load.
    unsafe { (*ctx.sock_addr).protocol as u8 }
}

/// Whether an address (16 bytes, IPv4 in the first 4) of `fam` is a
/// loopback address (127/8, ::1).
#[inline(always)]
pub fn is_loopback(addr: &[u8; 16], fam: u8) -> bool {
    if fam == family::INET as u8 {
        addr[0] == 127
    } else {
        addr[..15].iter().all(|b| *b == 0) && addr[15] == 1
    }
}
