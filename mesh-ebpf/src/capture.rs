//! Capture of meshed pods' outbound TCP (see `mesh_common::capture`): the
//! connect hooks call [`redirect`] after load balancing; the sock_ops
//! program re-keys the record once the connection is established.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{
    capture::{CAPTURE_OUTBOUND, CapturedKey, MeshedNetns, OUTBOUND_PORT, OrigDst},
    family,
    lb::PROTO_TCP,
    names::is_daemon_mark,
};

use crate::{
    lb,
    maps::{LW_CAPTURED, LW_MESHED_NETNS, LW_ORIG_DST},
    sockaddr::{self, Dest},
    splice,
};

/// The pod's entry when this connect is a meshed pod's TCP to be captured:
/// its netns is meshed, the socket is not the daemon's own, the destination
/// is not local.
#[inline(always)]
pub fn wanted(ctx: &SockAddrContext, dest: &Dest) -> Option<MeshedNetns> {
    if sockaddr::protocol(ctx) != PROTO_TCP || sockaddr::is_loopback(&dest.addr, dest.family) {
        return None;
    }
    // SAFETY: ctx->sk is always set for sock_addr programs; mark is a
    // readable field of a full socket.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if is_daemon_mark(mark) {
        return None;
    }
    // SAFETY: helper valid in cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    unsafe { LW_MESHED_NETNS.get(netns) }
        .copied()
        .filter(|m| m.flags & CAPTURE_OUTBOUND != 0)
}

/// Records where the socket was going (`to`, after load balancing; the app
/// asked for `asked`) and sends it to the daemon's listener in the pod.
/// getpeername still shows `asked`.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, asked: &Dest, to: &Dest) -> Dest {
    // SAFETY: helper valid in cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        addr: to.addr,
        port: to.port,
        family: to.family,
        _pad: [0; 5],
    };
    let _ = LW_ORIG_DST.insert(cookie, orig, 0);
    let mut listener = Dest {
        addr: [0; 16],
        port: OUTBOUND_PORT,
        family: to.family,
    };
    if to.family == family::INET as u8 {
        listener.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    } else {
        listener.addr[15] = 1;
    }
    lb::remember(ctx, &listener, asked);
    listener
}

#[sock_ops]
pub fn lw_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            rekey(&ctx);
            splice::established(&ctx, true);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => splice::established(&ctx, false),
        BPF_SOCK_OPS_STATE_CB => splice::state_changed(&ctx),
        _ => {}
    }
    0
}

/// Moves a captured socket's record to (netns, local port), the key the
/// daemon sees on the other end.
#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    // SAFETY: helper valid in sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { LW_ORIG_DST.get(cookie) }).copied() else {
        return;
    };
    let key = CapturedKey {
        // SAFETY: helper valid in sock_ops programs.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        port: ctx.local_port() as u16,
        family: orig.family,
        _pad: [0; 5],
    };
    let _ = LW_CAPTURED.insert(key, orig, 0);
    let _ = LW_ORIG_DST.remove(cookie);
}
