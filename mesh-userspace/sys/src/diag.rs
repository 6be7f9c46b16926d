//! The TCP sockets of the caller's network namespace, through the kernel's
//! socket diagnostics (`NETLINK_SOCK_DIAG`, what `ss` reads): listed, and
//! closed one by one with `SOCK_DESTROY` (what `ss -K` does; the kernel
//! aborts the connection and the peer gets a reset). The daemon uses it to
//! close connections the kernel's fast path let through once a policy
//! denies them: those never pass the daemon, so it holds nothing to close.
//!
//! Call these inside [`crate::os::in_netns`] to reach a pod's sockets.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ: usize = 8 + SOCKID;
/// `struct inet_diag_msg` up to the id's end (what is read of it).
const MSG_MIN: usize = 4 + SOCKID;

/// TCP states, as the kernel numbers them.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;

/// One TCP socket, as the kernel identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    /// The kernel's cookie for the socket: a destroy names it, so a socket
    /// that ended and had its addresses reused is never hit.
    cookie: [u8; 8],
}

/// The TCP sockets of this namespace in the given states (`TCP_*`), both
/// address families.
pub fn tcp_sockets(states: &[u8]) -> io::Result<Vec<TcpSocket>> {
    let mut nl = File::from(crate::os::netlink_socket(NETLINK_SOCK_DIAG)?);
    let mask = states.iter().fold(0u32, |m, s| m | 1 << s);
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut req = request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family);
        req[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&mask.to_ne_bytes());
        nl.write_all(&req)?;
        read_replies(&mut nl, |kind, body| {
            if kind == SOCK_DIAG_BY_FAMILY && body.len() >= MSG_MIN {
                out.extend(parse(body));
            }
        })?;
    }
    Ok(out)
}

/// Closes `socket` as `ss -K` does: the kernel aborts it (the peer gets a
/// reset). A socket already gone is not an error.
pub fn destroy(socket: &TcpSocket) -> io::Result<()> {
    let mut nl = File::from(crate::os::netlink_socket(NETLINK_SOCK_DIAG)?);
    let family = if socket.local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    let mut req = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family);
    req[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&u32::MAX.to_ne_bytes());
    write_id(&mut req[NLMSG_HDR + 8..], socket);
    nl.write_all(&req)?;
    read_replies(&mut nl, |_, _| {})
}

/// A netlink message header and an `inet_diag_req_v2` for TCP.
fn request(kind: u16, flags: u16, family: u8) -> Vec<u8> {
    let mut buf = vec![0u8; NLMSG_HDR + REQ];
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..6].copy_from_slice(&kind.to_ne_bytes());
    buf[6..8].copy_from_slice(&flags.to_ne_bytes());
    buf[NLMSG_HDR] = family;
    buf[NLMSG_HDR + 1] = libc::IPPROTO_TCP as u8;
    buf
}

/// Reads replies until the kernel's last one (DONE, or the ACK/error of a
/// request), handing each other message's type and body to `each`. An
/// error reply is the error (ENOENT, a socket already gone, is not).
fn read_replies(nl: &mut File, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = nl.read(&mut buf)?;
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < NLMSG_HDR || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a socket diagnostics reply with a bad length",
                ));
            }
            let body = &buf[at + NLMSG_HDR..at + len];
            if kind == NLMSG_ERROR {
                // The answer to a request with ACK, or a failed dump.
                let errno = body
                    .get(..4)
                    .map_or(0, |b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                return match errno {
                    0 | libc::ENOENT => Ok(()),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                };
            }
            if kind == NLMSG_DONE {
                return Ok(());
            }
            each(kind, body);
            // Messages are 4-byte aligned.
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// One `inet_diag_msg`: family, state, then the socket id.
fn parse(body: &[u8]) -> Option<TcpSocket> {
    let family = body[0];
    let state = body[1];
    let id = &body[4..4 + SOCKID];
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let addr = |b: &[u8]| -> Option<IpAddr> {
        if family == libc::AF_INET as u8 {
            Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into())
        } else if family == libc::AF_INET6 as u8 {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[..16]);
            Some(Ipv6Addr::from(a).into())
        } else {
            None
        }
    };
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&id[40..48]);
    Some(TcpSocket {
        local: SocketAddr::new(addr(&id[4..20])?, port(&id[0..2])),
        remote: SocketAddr::new(addr(&id[20..36])?, port(&id[2..4])),
        state,
        cookie,
    })
}

/// Writes `socket`'s id as `struct inet_diag_sockid`.
fn write_id(id: &mut [u8], socket: &TcpSocket) {
    id[0..2].copy_from_slice(&socket.local.port().to_be_bytes());
    id[2..4].copy_from_slice(&socket.remote.port().to_be_bytes());
    let put = |to: &mut [u8], ip: IpAddr| match ip {
        IpAddr::V4(v4) => to[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => to[..16].copy_from_slice(&v6.octets()),
    };
    put(&mut id[4..20], socket.local.ip());
    put(&mut id[20..36], socket.remote.ip());
    id[40..48].copy_from_slice(&socket.cookie);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_id_reads_back_as_written() {
        let socket = TcpSocket {
            local: "10.244.1.10:40000".parse().unwrap(),
            remote: "10.244.1.11:8080".parse().unwrap(),
            state: TCP_ESTABLISHED,
            cookie: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        let mut body = vec![0u8; MSG_MIN];
        body[0] = libc::AF_INET as u8;
        body[1] = TCP_ESTABLISHED;
        write_id(&mut body[4..], &socket);
        assert_eq!(parse(&body), Some(socket));
    }
}
