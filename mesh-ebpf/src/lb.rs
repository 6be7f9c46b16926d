//! Service load balancing at connect time (Cilium's socket-LB, in our terms):
//! look the destination up as a service, pick a backend, rewrite the socket's
//! destination, and remember the translation for replies and getpeername.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use mesh_common::lb::{
    ALG_MAGLEV, Affinity, AffinityKey, Backend, INLINE_SLOTS, PROTO_TCP, PROTO_UDP, RevNat,
    RevNatKey, SVC_L7, Service, SvcKey, SvcStats, TableKey, UNALLOCATED_SVC_ID, inline_slots,
    maglev_flow, maglev_index,
};

use crate::{
    maps::{
        LW_AFFINITY, LW_BACKENDS, LW_MAGLEV, LW_REVNAT, LW_SERVICES, LW_SLOTS, LW_SOCK_REVNAT,
        LW_SVC_CIDRS, LW_SVC_STATS, cidr_lookup_key,
    },
    sockaddr::{self, Dest},
};

/// What to do with the syscall.
pub enum Verdict {
    /// Not a service (or not TCP/UDP): leave it alone.
    Pass,
    /// Sent to a backend; the caller writes this destination.
    Translated(Dest),
    /// A service with no ready backend: fail at once, as kube-proxy's REJECT.
    Refuse,
    /// A service with HTTP routes, dialled by a meshed pod: not balanced
    /// here; captured with the frontend as its destination.
    Routed,
}

/// Looks `dest` up as a service and picks a backend for socket `ctx`
/// (`meshed`: the socket is a meshed pod's, which routes apply to).
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, dest: &Dest, proto: u8, meshed: bool) -> Verdict {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Verdict::Pass;
    }
    let key = SvcKey {
        addr: dest.addr,
        port: dest.port,
        proto,
        family: dest.family,
    };
    // Two tries: an update may delete the slot or backend we were about to read
    // between our lookups; the second try reads the service's new generation.
    for _ in 0..2 {
        let Some(svc) = LW_SERVICES.get_ptr(key) else {
            return unallocated(dest);
        };
        // SAFETY: a live entry, read in place (not copied: with its inline
        // slots it is 88 bytes). An update replaces the element whole; a
        // field read twice could differ if the memory were reused, so no
        // check relies on two reads agreeing (`select` bounds its index by
        // its own read of `count`), and a stale backend id is caught by
        // the backend lookup and retried.
        let svc = unsafe { &*svc };
        if meshed && svc.flags & SVC_L7 != 0 {
            count(svc.id, true);
            return Verdict::Routed;
        }
        if svc.count == 0 {
            count(svc.id, false);
            return Verdict::Refuse;
        }
        let Some(backend) = pick(ctx.sock_addr.cast(), svc) else {
            continue;
        };
        let to = Dest {
            addr: backend.addr,
            port: backend.port,
            family: dest.family,
        };
        remember(ctx, proto, &to, dest, None);
        count(svc.id, true);
        return Verdict::Translated(to);
    }
    Verdict::Pass
}

/// An address that is no service: refused if it is in a service CIDR (a
/// deleted or never allocated ClusterIP, as kube-proxy's nftables mode does),
/// left alone otherwise.
#[inline(always)]
fn unallocated(dest: &Dest) -> Verdict {
    let key = cidr_lookup_key(dest.family, dest.addr);
    if LW_SVC_CIDRS.get(&key).is_some() {
        count(UNALLOCATED_SVC_ID, false);
        Verdict::Refuse
    } else {
        Verdict::Pass
    }
}

/// The backend for this socket: the client's affine one if still valid, else
/// one chosen by the service's algorithm.
#[inline(always)]
fn pick(ctx: *mut core::ffi::c_void, svc: &Service) -> Option<Backend> {
    if svc.affinity_timeout_s == 0 {
        return backend(select(ctx, svc)?);
    }
    // The client is its network namespace: one pod (Cilium's socket-LB does
    // the same, since the source address is not chosen yet at connect()).
    // SAFETY: helpers valid in cgroup sock_addr programs; ctx is the program's.
    let key = AffinityKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx) },
        svc_id: svc.id,
        _pad: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    // SAFETY: copied out at once.
    if let Some(seen) = unsafe { LW_AFFINITY.get(key) }.copied()
        && now.wrapping_sub(seen.last_used_ns) < timeout_ns
        // A backend that still exists is still a member (ids are per service).
        && let Some(b) = backend(seen.backend_id)
    {
        let _ = LW_AFFINITY.insert(
            key,
            Affinity {
                last_used_ns: now,
                ..seen
            },
            0,
        );
        return Some(b);
    }
    let id = select(ctx, svc)?;
    let b = backend(id)?;
    let _ = LW_AFFINITY.insert(
        key,
        Affinity {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        },
        0,
    );
    Some(b)
}

/// The socket's bound source address (context words) and port (0 when not
/// bound yet), read from the `bpf_sock` of the sock_addr context.
#[inline(always)]
fn bound_source(ctx: *mut core::ffi::c_void) -> ([u32; 4], u32) {
    use core::ptr::{addr_of, read_volatile};
    let sa = ctx.cast::<aya_ebpf::bindings::bpf_sock_addr>();
    // SAFETY: ctx is the program's bpf_sock_addr; its `sk` is the socket
    // (PTR_TO_SOCKET for these hooks). The verifier allows only loads at a
    // constant offset from it (no pointer arithmetic), so each field is read
    // with its own volatile load, the compiler cannot fold them into a
    // computed address.
    unsafe {
        let sk = read_volatile(addr_of!((*sa).__bindgen_anon_1.sk));
        if sk.is_null() {
            return ([0; 4], 0);
        }
        let family = read_volatile(addr_of!((*sk).family));
        let port = read_volatile(addr_of!((*sk).src_port));
        let ip4 = read_volatile(addr_of!((*sk).src_ip4));
        let ip6 = [
            read_volatile(addr_of!((*sk).src_ip6[0])),
            read_volatile(addr_of!((*sk).src_ip6[1])),
            read_volatile(addr_of!((*sk).src_ip6[2])),
            read_volatile(addr_of!((*sk).src_ip6[3])),
        ];
        if family == u32::from(mesh_common::family::INET) {
            ([ip4, 0, 0, 0], port)
        } else {
            (ip6, port)
        }
    }
}

/// A backend id from the service's live slot generation: inline in the
/// service's entry for a small random service, else from its table.
#[inline(always)]
fn select(ctx: *mut core::ffi::c_void, svc: &Service) -> Option<u32> {
    let table = TableKey {
        svc_id: svc.id,
        generation: svc.generation,
    };
    let (algorithm, count) = (svc.algorithm, svc.count);
    // SAFETY (both lookups): the value is copied out at once.
    let slot = if algorithm == ALG_MAGLEV {
        let (src, src_port) = bound_source(ctx);
        let flow = maglev_flow(src, src_port, {
            // SAFETY: helper valid in cgroup sock_addr programs.
            unsafe { bpf_get_socket_cookie(ctx) }
        });
        unsafe { LW_MAGLEV.get_value(&table, &maglev_index(flow, svc.id, count)) }.copied()
    } else {
        // `checked`: the entry may be read again here (it is not copied),
        // so the caller's non-zero check does not prove this read's.
        // SAFETY: helper without preconditions.
        let index = unsafe { bpf_get_prandom_u32() }.checked_rem(count)?;
        if inline_slots(algorithm, count) {
            // The mask only proves the bound to the verifier: index < count.
            return Some(svc.slots[index as usize & (INLINE_SLOTS - 1)]);
        }
        unsafe { LW_SLOTS.get_value(&table, &index) }.copied()
    };
    slot.map(|slot| slot.backend_id)
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { LW_BACKENDS.get(id) }.copied()
}

/// Records that this socket's `backend` stands for `service`, for
/// getpeername and for the source of UDP replies: a TCP socket in its own
/// storage (with `captured`, where a captured socket was going), a UDP
/// socket by its cookie and backend. `proto` is the caller's, read once:
/// reading the context again here can make the compiler keep a pointer
/// into it on the stack, which the verifier refuses.
#[inline(always)]
pub fn remember(
    ctx: &SockAddrContext,
    proto: u8,
    backend: &Dest,
    service: &Dest,
    captured: Option<&Dest>,
) {
    if proto == PROTO_TCP {
        // SAFETY: the storage of the program's own socket, created (zeroed)
        // if missing; a socket connected again gets its new translation.
        let slot = unsafe { LW_SOCK_REVNAT.get_or_insert_ptr_mut(ctx, None) };
        if slot.is_null() {
            return;
        }
        // SAFETY: a live storage slot of this socket. Written field by
        // field: no whole value built on the stack and copied in (twice,
        // with an initial value), which the connect hook's profile showed.
        unsafe {
            (*slot).backend = backend.addr;
            (*slot).service = service.addr;
            (*slot).backend_port = backend.port;
            (*slot).service_port = service.port;
            (*slot).family = backend.family;
            match captured {
                Some(c) => {
                    (*slot).captured = c.addr;
                    (*slot).captured_port = c.port;
                    (*slot).captured_family = c.family;
                }
                // `captured` means nothing without its family.
                None => (*slot).captured_family = 0,
            }
        }
        return;
    }
    // SAFETY: helper valid in cgroup sock_addr programs.
    let key = revnat_key(
        unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        backend,
    );
    let value = RevNat {
        addr: service.addr,
        port: service.port,
        _pad: [0; 6],
    };
    let _ = LW_REVNAT.insert(key, value, 0);
}

/// The service address to show for peer `peer` of socket `ctx`, if any. A
/// TCP socket that was never translated has no storage: one lookup, no
/// cookie, no hash.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, peer: &Dest) -> Option<Dest> {
    if sockaddr::protocol(ctx) == PROTO_TCP {
        // SAFETY: the program's own socket; never created here.
        let slot = unsafe { LW_SOCK_REVNAT.get_ptr_mut(ctx) };
        if slot.is_null() {
            return None;
        }
        // SAFETY: a live storage slot of this socket; only the fields
        // compared and returned are read.
        let rev = unsafe { &*slot };
        if rev.backend != peer.addr || rev.backend_port != peer.port || rev.family != peer.family {
            return None;
        }
        return Some(Dest {
            addr: rev.service,
            port: rev.service_port,
            family: peer.family,
        });
    }
    // SAFETY: helper valid in cgroup sock_addr programs.
    let key = revnat_key(unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }, peer);
    // SAFETY: copied out at once.
    let rev = unsafe { LW_REVNAT.get(key) }.copied()?;
    Some(Dest {
        addr: rev.addr,
        port: rev.port,
        family: peer.family,
    })
}

#[inline(always)]
fn revnat_key(socket_cookie: u64, addr: &Dest) -> RevNatKey {
    RevNatKey {
        socket_cookie,
        addr: addr.addr,
        port: addr.port,
        family: addr.family,
        _pad: [0; 5],
    }
}

#[inline(always)]
fn count(svc_id: u32, sent: bool) {
    let (connects, refused) = if sent { (1, 0) } else { (0, 1) };
    match LW_SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: this CPU's slot of a live entry; no other CPU writes it.
        Some(stats) => unsafe {
            (*stats).connects += connects;
            (*stats).refused += refused;
        },
        None => {
            let _ = LW_SVC_STATS.insert(svc_id, SvcStats { connects, refused }, 0);
        }
    }
}
