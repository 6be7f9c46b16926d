//! Capture of meshed pods' outbound TCP (see `mesh_common::capture`): the
//! connect hooks call [`redirect`] after load balancing; the sock_ops
//! program re-keys the record once the connection is established.

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB,
    },
    helpers::{bpf_get_netns_cookie, generated::bpf_sk_storage_get},
    macros::sock_ops,
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{
    capture::{CAPTURE_OUTBOUND, CapturedKey, MeshedNetns, OUTBOUND_PORT, OrigDst},
    family,
    lb::{PROTO_TCP, SockRevNat},
    names::is_daemon_mark,
};

use crate::{
    lb,
    maps::{LW_CAPTURED, LW_MESHED_NETNS, LW_SOCK_REVNAT},
    sockaddr::{self, Dest},
    splice,
};

/// The pod's entry when this connect is a meshed pod's TCP to be captured:
/// its netns is meshed, the socket is not the daemon's own, the destination
/// is not local.
#[inline(always)]
pub fn wanted(ctx: &SockAddrContext, dest: &Dest, proto: u8) -> Option<MeshedNetns> {
    if proto != PROTO_TCP || sockaddr::is_loopback(&dest.addr, dest.family) {
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

/// Sends the socket to the daemon's listener in the pod, recording in its
/// storage where it was going (`to`, after load balancing; the app asked
/// for `asked`). getpeername still shows `asked`.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, asked: &Dest, to: &Dest) -> Dest {
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
    // Only TCP is captured.
    lb::remember(ctx, PROTO_TCP, &listener, asked, Some(to));
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

/// Hands a captured socket's destination to the daemon, keyed by (netns,
/// local port): what it sees on the other end. Every other socket has no
/// storage, or storage without a captured destination.
#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    // SAFETY: `sk` is a field of the program's context (null-checked); the
    // map pointer is the map's own definition (aya's SkStorage takes only a
    // sock_addr context); the storage is only read, never created here, and
    // copied out at once.
    let stored = unsafe {
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        if sk.is_null() {
            return;
        }
        let map = core::ptr::from_ref(&LW_SOCK_REVNAT).cast_mut().cast();
        let slot = bpf_sk_storage_get(map, sk.cast(), null_mut(), 0).cast::<SockRevNat>();
        if slot.is_null() {
            return;
        }
        *slot
    };
    if stored.captured_family == 0 {
        return;
    }
    let key = CapturedKey {
        // SAFETY: helper valid in sock_ops programs.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        port: ctx.local_port() as u16,
        family: stored.captured_family,
        _pad: [0; 5],
    };
    let orig = OrigDst {
        addr: stored.captured,
        port: stored.captured_port,
        family: stored.captured_family,
        _pad: [0; 5],
    };
    let _ = LW_CAPTURED.insert(key, orig, 0);
}
