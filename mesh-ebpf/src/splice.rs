//! Same-node acceleration (see `mesh_common::splice`): sock_ops adds the
//! sockets of local hops when they are established, the app's or pod's end
//! to `LW_SPLICE` and the daemon's end to `LW_SPLICE_TO`; `lw_sk_msg`
//! (attached to `LW_SPLICE`) moves each write of the former straight into
//! the daemon's receive queue.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT1,
        BPF_TCP_LAST_ACK,
    },
    helpers::{bpf_get_netns_cookie, bpf_map_delete_elem},
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    capture::{AddrKey, OUTBOUND_PORT},
    family,
    names::DELIVERY_MARK,
    splice::{
        ACCELERATION, SETTINGS_INDEX, STAT_CAPTURE_LEG, STAT_DELIVERY_LEG, STAT_MAP_FULL, SpliceKey,
    },
};

use crate::maps::{
    LW_MESHED_NETNS, LW_NODE_ADDRS, LW_SETTINGS, LW_SPLICE, LW_SPLICE_OFF, LW_SPLICE_STATS,
    LW_SPLICE_TO,
};

/// sk_msg verdict: deliver (to the peer if a redirect was set, else as usual).
const SK_PASS: u32 = 1;
/// What `bpf_msg_redirect_hash` returns when it set the redirect.
const REDIRECT_SET: i64 = 1;

/// Whether the node's acceleration switch is on.
#[inline(always)]
fn enabled() -> bool {
    LW_SETTINGS
        .get(SETTINGS_INDEX)
        .is_some_and(|s| s.flags & ACCELERATION != 0)
}

#[inline(always)]
fn count(stat: u32) {
    if let Some(c) = LW_SPLICE_STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn addr_key(k: &SpliceKey) -> AddrKey {
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&k.remote[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&k.remote[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&k.remote[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&k.remote[3].to_ne_bytes());
    AddrKey {
        addr,
        family: k.family,
        _pad: [0; 3],
    }
}

/// Which map a local hop's socket goes in.
enum Role {
    /// An app's or pod's socket: its writes are moved to the daemon.
    Sender,
    /// The daemon's socket: it receives them (its own writes go the usual
    /// way, where TCP bounds what a slow reader makes anyone buffer).
    Daemon,
}

/// Called by sock_ops when a connection is established (`active`: we
/// connected). Adds the socket if it is one end of a local hop.
#[inline(always)]
pub fn established(ctx: &SockOpsContext, active: bool) {
    if !enabled() {
        return;
    }
    let ops = ctx.ops;
    let mut k = ops_key(ctx);
    // SAFETY: helper valid in sock_ops programs.
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    // SAFETY: only tested for presence.
    let meshed = unsafe { LW_MESHED_NETNS.get(netns) }.is_some();
    let (stat, role) = if k.is_loopback() {
        // The capture leg: the app's socket to the in-pod listener (a
        // sender), or the listener's accepted socket (the daemon's).
        let listener_port = if active { k.remote_port } else { k.local_port };
        if !meshed || listener_port != OUTBOUND_PORT {
            return;
        }
        k.netns_cookie = netns;
        (
            STAT_CAPTURE_LEG,
            if active { Role::Sender } else { Role::Daemon },
        )
    } else if active {
        // The daemon's connection to a pod here.
        // SAFETY: `sk` is a full socket in the established callbacks, checked
        // for null; `mark` is a readable field of it.
        let mark = unsafe {
            let sk = (*ops).__bindgen_anon_2.sk;
            if sk.is_null() {
                return;
            }
            (*sk).mark
        };
        if mark != DELIVERY_MARK {
            return;
        }
        (STAT_DELIVERY_LEG, Role::Daemon)
    } else {
        // A meshed pod's end of a connection from the node (the daemon).
        // SAFETY: only tested for presence.
        if !meshed || unsafe { LW_NODE_ADDRS.get(addr_key(&k)) }.is_none() {
            return;
        }
        (STAT_DELIVERY_LEG, Role::Sender)
    };
    if let Role::Sender = role {
        // A new connection on a reused tuple starts spliced.
        let _ = LW_SPLICE_OFF.remove(k);
        // Told of its state changes: it leaves the map when it half-closes.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
    // SAFETY: `ops` is this program's context.
    let added = match role {
        Role::Sender => LW_SPLICE.update(&mut k, unsafe { &mut *ops }, u64::from(BPF_ANY)),
        // SAFETY: as above.
        Role::Daemon => LW_SPLICE_TO.update(&mut k, unsafe { &mut *ops }, u64::from(BPF_ANY)),
    };
    match added {
        Ok(()) => count(stat),
        Err(_) => count(STAT_MAP_FULL),
    }
}

/// The key of the socket behind a `bpf_sock_ops` or `sk_msg_md` pointer
/// (without the netns cookie): both contexts have the same tuple fields.
/// A macro, as the two context types share fields but no trait.
macro_rules! context_key {
    ($ctx:expr) => {{
        let c = $ctx;
        // SAFETY: plain loads of the program's own context; the IPv6 fields
        // are read only for IPv6 sockets.
        unsafe {
            let fam = (*c).family;
            let (l6, r6) = if fam == u32::from(family::INET6) {
                ((*c).local_ip6, (*c).remote_ip6)
            } else {
                ([0; 4], [0; 4])
            };
            SpliceKey::from_context(
                fam,
                (*c).local_ip4,
                (*c).remote_ip4,
                l6,
                r6,
                (*c).local_port,
                (*c).remote_port,
            )
        }
    }};
}

/// The socket's key as sock_ops sees it (without the netns cookie).
#[inline(always)]
fn ops_key(ctx: &SockOpsContext) -> SpliceKey {
    context_key!(ctx.ops)
}

/// Called by sock_ops on a sender's state change. When the app (or pod)
/// half-closes, its socket leaves `LW_SPLICE`: it has nothing more to
/// write, and a socket in a sockmap reads through the kernel's sockmap
/// receive path, whose blocking reads return early once its FIN is
/// acknowledged (an app blocked in recv() after shutdown(SHUT_WR) would see
/// a false end of stream). Nothing is ever moved into a sender, so leaving
/// loses nothing.
#[inline(always)]
pub fn state_changed(ctx: &SockOpsContext) {
    // A sender writes nothing more once it sent its FIN (FIN_WAIT1; LAST_ACK
    // after its peer's) or once the connection is gone (CLOSE).
    let state = ctx.arg(1);
    if state != BPF_TCP_FIN_WAIT1 && state != BPF_TCP_LAST_ACK && state != BPF_TCP_CLOSE {
        return;
    }
    let mut k = ops_key(ctx);
    if k.is_loopback() {
        // SAFETY: helper valid in sock_ops programs.
        k.netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    }
    // Its switched-off mark is no use any more: `LW_SPLICE_OFF` is a plain
    // hash (no eviction), so each mark goes with its sender.
    let _ = LW_SPLICE_OFF.remove(k);
    if state != BPF_TCP_FIN_WAIT1 {
        return;
    }
    // SAFETY: the map pointer is the map's own definition and `k` lives on
    // the stack for the call; sock_ops may delete from a sockhash.
    unsafe {
        bpf_map_delete_elem(
            core::ptr::from_ref(&LW_SPLICE).cast_mut().cast(),
            core::ptr::from_ref(&k).cast(),
        );
    }
}

#[sk_msg]
pub fn lw_sk_msg(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let mut k = context_key!(msg);
    if k.is_loopback() {
        // SAFETY: helper valid in sk_msg programs (Linux 5.15+).
        k.netns_cookie = unsafe { bpf_get_netns_cookie(msg.cast()) };
    }
    // SAFETY: only tested for presence.
    if unsafe { LW_SPLICE_OFF.get(k) }.is_some() {
        return SK_PASS;
    }
    // The daemon reads moved bytes before those that came the usual way, so
    // once a socket has written the usual way it must never be moved again:
    // switched off (even if switched on again later), or its peer not (yet)
    // in the map, it stays off for good.
    let mut peer = k.peer();
    if !enabled()
        || LW_SPLICE_TO.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) != REDIRECT_SET
    {
        let _ = LW_SPLICE_OFF.insert(k, 1, 0);
    }
    SK_PASS
}
