//! STRICT mode for meshed pods: sk_lookup, attached to each STRICT pod's
//! network namespace, steers plain-text TCP arriving for the pod to the
//! daemon's listener inside it (which resets it). Left alone: connections
//! from the node itself (the daemon delivering tunnel streams, the kubelet's
//! probes) and from the pod to itself.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{capture::AddrKey, family, lb::PROTO_TCP};

use crate::{
    fastpath,
    maps::{LW_INBOUND, LW_NODE_ADDRS},
    sockaddr,
};

/// sk_lookup verdict: go on with the (possibly assigned) lookup.
const SK_PASS: u32 = 1;

#[sk_lookup]
pub fn lw_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: plain loads of the program's own context.
    let (fam, proto) = unsafe { ((*ctx.lookup).family, (*ctx.lookup).protocol) };
    if proto != u32::from(PROTO_TCP) {
        return SK_PASS;
    }
    let (local, remote) = if fam == u32::from(family::INET) {
        // SAFETY: plain loads of the program's own context.
        let (l, r) = unsafe { ((*ctx.lookup).local_ip4, (*ctx.lookup).remote_ip4) };
        (key4(l), key4(r))
    } else {
        // SAFETY: plain loads of the program's own context.
        let (l, r) = unsafe { ((*ctx.lookup).local_ip6, (*ctx.lookup).remote_ip6) };
        (key6(l), key6(r))
    };
    if local.addr == remote.addr || sockaddr::is_loopback(&remote.addr, remote.family) {
        return SK_PASS;
    }
    // SAFETY: only tested for presence.
    if unsafe { LW_NODE_ADDRS.get(remote) }.is_some() {
        return SK_PASS;
    }
    // A meshed pod here that the fast path let through (policy allowed the
    // pair in the connect hook).
    if fastpath::allowed_here(remote, local) {
        return SK_PASS;
    }
    // Not a STRICT pod (no listener for it): the normal lookup.
    let _ = LW_INBOUND.redirect_sk_lookup(&ctx, local, 0);
    SK_PASS
}

#[inline(always)]
fn key4(ip: u32) -> AddrKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip.to_ne_bytes());
    AddrKey {
        addr,
        family: family::INET as u8,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn key6(ip: [u32; 4]) -> AddrKey {
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&ip[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&ip[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&ip[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&ip[3].to_ne_bytes());
    AddrKey {
        addr,
        family: family::INET6 as u8,
        _pad: [0; 3],
    }
}
