//! The same-node fast path's decision at connect time (see
//! `mesh_common::fastpath`): after load balancing, a meshed pod's connect
//! to a meshed pod here goes straight to it when `LW_PAIR_POLICY` allows
//! the pair, fails with ECONNREFUSED when it denies it, and goes to the
//! daemon otherwise. Each decision is counted with its reason.

use mesh_common::{
    capture::{AddrKey, MeshedNetns},
    fastpath::{
        DECIDED_ALLOW, DECIDED_DENY, PairKey, TO_DAEMON_NO_IDENTITY, TO_DAEMON_NOT_LOCAL,
        TO_DAEMON_POLICY, TO_DAEMON_SWITCHED_OFF, VERDICT_ALLOW, VERDICT_DENY,
    },
    splice::{ACCELERATION, FAST_PATH, SETTINGS_INDEX},
};

use crate::{
    maps::{LW_FAST_STATS, LW_LOCAL_PODS, LW_PAIR_POLICY, LW_SETTINGS},
    sockaddr::Dest,
};

/// Where a meshed pod's connection goes.
pub enum Path {
    /// Straight to the destination pod.
    Direct,
    /// Nowhere: policy denies it.
    Refuse,
    /// Through the daemon's in-pod listener.
    Daemon,
}

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

/// Decides for a connection from the pod of `source` to `to`.
#[inline(always)]
pub fn decide(source: &MeshedNetns, to: &Dest) -> Path {
    let dest = addr_key(to);
    // SAFETY: only tested for presence.
    if unsafe { LW_LOCAL_PODS.get(dest) }.is_none() {
        count(TO_DAEMON_NOT_LOCAL);
        return Path::Daemon;
    }
    let on = ACCELERATION | FAST_PATH;
    if !LW_SETTINGS
        .get(SETTINGS_INDEX)
        .is_some_and(|s| s.flags & on == on)
    {
        count(TO_DAEMON_SWITCHED_OFF);
        return Path::Daemon;
    }
    if source.identity == 0 {
        count(TO_DAEMON_NO_IDENTITY);
        return Path::Daemon;
    }
    pair(source.identity, dest)
}

/// The pair's verdict, counted.
#[inline(always)]
fn pair(src_identity: u32, dest: AddrKey) -> Path {
    let key = PairKey { dest, src_identity };
    // SAFETY: copied out at once.
    match unsafe { LW_PAIR_POLICY.get(key) }.copied() {
        Some(VERDICT_ALLOW) => {
            count(DECIDED_ALLOW);
            Path::Direct
        }
        Some(VERDICT_DENY) => {
            count(DECIDED_DENY);
            Path::Refuse
        }
        _ => {
            count(TO_DAEMON_POLICY);
            Path::Daemon
        }
    }
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
