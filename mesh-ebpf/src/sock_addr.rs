//! cgroup `sock_addr` programs: the connect-time hooks of the service load
//! balancer. Entry points stay thin; the logic is in `lb` and `sockaddr`.
//!
//! - connect4/6: TCP and connected UDP; the socket is sent to a backend.
//! - sendmsg4/6: unconnected UDP sends, translated per datagram.
//! - recvmsg4/6: UDP replies appear to come from the service address.
//! - getpeername4/6: the application sees the service address as its peer.
//!
//! The IPv6 hooks read an IPv4-mapped address as IPv4 and write IPv4
//! results back mapped, so a dual-stack socket dialling IPv4 is balanced,
//! captured and reverse-translated as an IPv4 socket is.

use crate::{
    capture, fastpath,
    lb::{self, Verdict},
    sockaddr::{self, Dest},
};
use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};

/// Return value that lets the syscall go on (the only one recvmsg and
/// getpeername hooks may return).
const ALLOW: i32 = 1;
/// Return value that fails the syscall, with the error set by `bpf_set_retval`.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lw_connect4(ctx: SockAddrContext) -> i32 {
    let dest = sockaddr::read4(&ctx);
    connect(&ctx, &dest, sockaddr::write4)
}

#[cgroup_sock_addr(connect6)]
pub fn lw_connect6(ctx: SockAddrContext) -> i32 {
    let dest = sockaddr::read6_unmapped(&ctx);
    connect(&ctx, &dest, sockaddr::write6_mapped)
}

/// A connect: load balancing, then for a meshed pod the same-node fast
/// path's decision, else capture (the backend is chosen once, here in the
/// kernel, and the daemon is told it). A meshed pod's connect to a Service
/// with HTTP routes is captured unbalanced: its daemon routes each request.
#[inline(always)]
fn connect(ctx: &SockAddrContext, dest: &Dest, write: fn(&SockAddrContext, &Dest)) -> i32 {
    // Read once: a second read can leave a pointer into the context on the
    // stack, which the verifier refuses.
    let proto = sockaddr::protocol(ctx);
    let Some(source) = capture::wanted(ctx, dest, proto) else {
        return apply(ctx, dest, proto, write);
    };
    let to = match lb::translate(ctx, dest, proto, true) {
        Verdict::Pass => *dest,
        Verdict::Translated(to) => to,
        Verdict::Refuse => return refuse(),
        Verdict::Routed => {
            write(ctx, &capture::redirect(ctx, dest, dest));
            return ALLOW;
        }
    };
    match fastpath::decide(&source, &to) {
        fastpath::Path::Direct => write(ctx, &to),
        fastpath::Path::Refuse => return refuse(),
        fastpath::Path::Daemon => write(ctx, &capture::redirect(ctx, dest, &to)),
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lw_sendmsg4(ctx: SockAddrContext) -> i32 {
    apply(
        &ctx,
        &sockaddr::read4(&ctx),
        sockaddr::protocol(&ctx),
        sockaddr::write4,
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lw_sendmsg6(ctx: SockAddrContext) -> i32 {
    apply(
        &ctx,
        &sockaddr::read6_unmapped(&ctx),
        sockaddr::protocol(&ctx),
        sockaddr::write6_mapped,
    )
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lw_recvmsg4(ctx: SockAddrContext) -> i32 {
    unapply(&ctx, &sockaddr::read4(&ctx), sockaddr::write4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lw_recvmsg6(ctx: SockAddrContext) -> i32 {
    unapply(
        &ctx,
        &sockaddr::read6_unmapped(&ctx),
        sockaddr::write6_mapped,
    )
}

#[cgroup_sock_addr(getpeername4)]
pub fn lw_getpeername4(ctx: SockAddrContext) -> i32 {
    unapply(&ctx, &sockaddr::read4(&ctx), sockaddr::write4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lw_getpeername6(ctx: SockAddrContext) -> i32 {
    unapply(
        &ctx,
        &sockaddr::read6_unmapped(&ctx),
        sockaddr::write6_mapped,
    )
}

/// Forward translation: service address to backend.
#[inline(always)]
fn apply(ctx: &SockAddrContext, dest: &Dest, proto: u8, write: fn(&SockAddrContext, &Dest)) -> i32 {
    match lb::translate(ctx, dest, proto, false) {
        // `Routed` is only for meshed sockets.
        Verdict::Pass | Verdict::Routed => ALLOW,
        Verdict::Translated(to) => {
            write(ctx, &to);
            ALLOW
        }
        Verdict::Refuse => refuse(),
    }
}

/// Fails the connect (or send) with ECONNREFUSED.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: helper valid in cgroup programs; sets the syscall's error.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// Reverse translation: backend address back to the service's.
#[inline(always)]
fn unapply(ctx: &SockAddrContext, peer: &Dest, write: fn(&SockAddrContext, &Dest)) -> i32 {
    if let Some(service) = lb::reverse(ctx, peer) {
        write(ctx, &service);
    }
    ALLOW
}
