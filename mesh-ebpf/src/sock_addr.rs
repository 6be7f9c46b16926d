//! cgroup `sock_addr` programs: the connect-time hooks.
//!
//! For now they only count: each connect() made below the attach cgroup bumps a
//! per-CPU counter for its destination port, and the connect goes on unchanged.
//! The service load balancer rewrites the destination here in a later step.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use mesh_common::{
    conn::{ConnCount, ConnKey},
    family,
};

use crate::maps::LW_CONN_BY_PORT;

/// Verdict that lets the syscall go on.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn lw_connect4(ctx: SockAddrContext) -> i32 {
    count_connect(&ctx, family::INET);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lw_connect6(ctx: SockAddrContext) -> i32 {
    count_connect(&ctx, family::INET6);
    ALLOW
}

#[inline(always)]
fn count_connect(ctx: &SockAddrContext, family: u16) {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the
    // duration of the call; these are plain 4-byte context loads.
    let (user_port, protocol) = unsafe { ((*ctx.sock_addr).user_port, (*ctx.sock_addr).protocol) };
    // `user_port` holds the port in network byte order in its low 16 bits.
    let key = ConnKey::new(u16::from_be(user_port as u16), family, protocol as u8);
    match LW_CONN_BY_PORT.get_ptr_mut(key) {
        // SAFETY: the pointer is this CPU's slot of a live entry; per-CPU
        // values are never written concurrently by another CPU.
        Some(count) => unsafe { (*count).connects += 1 },
        None => {
            // BPF_ANY (0): if another CPU inserted the key meanwhile, a per-CPU
            // update writes only this CPU's slot, so no count is lost. A failed
            // insert (map full) loses a count, never a connect.
            let _ = LW_CONN_BY_PORT.insert(key, ConnCount { connects: 1 }, 0);
        }
    }
}
