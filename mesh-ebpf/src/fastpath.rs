//! The same-node fast path's decision at connect time (see
//! `mesh_common::fastpath`): after load balancing, a meshed pod's connect
//! to a meshed pod here goes straight to it when `LW_PAIR_POLICY` allows
//! the pair, fails with ECONNREFUSED when it denies it, and goes to the
//! daemon otherwise. Each decision is counted with its reason.

use mesh_common::{
    capture::{AddrKey, MeshedNetns},
    fastpath::{PairKey, VERDICT_ALLOW},
    splice::SETTINGS_INDEX,
};

use crate::{
    maps::{LW_FAST_STATS, LW_LOCAL_PODS, LW_PAIR_POLICY, LW_SETTINGS},
    sockaddr::Dest,
};

pub use mesh_common::fastpath::Path;

#[inline(always)]
fn count(stat: u32) {
    if let Some(c) = LW_FAST_STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn addr_key(to: &Dest) -> AddrKey {
    AddrKey {
        addr: to.addr,
        family: to.family,
        _pad: [0; 3],
    }
}

/// Decides for a connection from the pod of `source` to `to`
/// ([`mesh_common::fastpath::decide`] over this node's maps), counted.
#[inline(always)]
pub fn decide(source: &MeshedNetns, to: &Dest) -> Path {
    let dest = addr_key(to);
    let (path, stat) = mesh_common::fastpath::decide(
        // SAFETY: only tested for presence.
        || unsafe { LW_LOCAL_PODS.get(dest) }.is_some(),
        || LW_SETTINGS.get(SETTINGS_INDEX).map_or(0, |s| s.flags),
        source.identity,
        || {
            let key = PairKey {
                dest,
                src_identity: source.identity,
            };
            // SAFETY: copied out at once.
            unsafe { LW_PAIR_POLICY.get(key) }.copied()
        },
    );
    count(stat);
    path
}

/// For sk_lookup in a STRICT pod: whether a plain connection from `remote`
/// (a meshed pod here) to `local` is one the fast path let through.
#[inline(always)]
pub fn allowed_here(remote: AddrKey, local: AddrKey) -> bool {
    // SAFETY: copied out at once.
    let Some(source) = (unsafe { LW_LOCAL_PODS.get(remote) }).copied() else {
        return false;
    };
    let key = PairKey {
        dest: local,
        src_identity: source.identity,
    };
    // SAFETY: copied out at once.
    unsafe { LW_PAIR_POLICY.get(key) }.copied() == Some(VERDICT_ALLOW)
}
