//! Sockets the node daemon opens itself. They carry [`BYPASS_MARK`], which
//! the kernel programs leave alone: the daemon's own connections (to a
//! tunnel peer, to a destination pod) must never be captured back into it.

use std::{net::SocketAddr, os::fd::AsFd as _};

use tokio::net::{TcpSocket, TcpStream};

/// `SO_MARK` of the daemon's sockets ("LW"), as Istio marks its proxy's
/// sockets 1337.
pub const BYPASS_MARK: u32 = mesh_common::names::BYPASS_MARK;

/// The accept queue of the daemon's listeners in pods. std's 128 overflows
/// when a pod opens thousands of connections at once (its handshakes are
/// then dropped and retried with backoff, for up to a minute); the kernel
/// caps it at the namespace's `net.core.somaxconn` (4,096 by default).
pub const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket on `addr` (`SO_REUSEADDR`, as std's), with an accept
/// queue of [`LISTEN_BACKLOG`]; opened in the calling thread's network
/// namespace.
pub fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A TCP connection to `addr` that the capture programs do not redirect.
pub async fn connect_bypass(addr: SocketAddr) -> std::io::Result<TcpStream> {
    connect_marked(addr, Some(BYPASS_MARK)).await
}

/// A connection to a pod on this node: not captured either, and spliced
/// with the pod's socket when acceleration is on.
pub async fn connect_delivery(addr: SocketAddr) -> std::io::Result<TcpStream> {
    connect_marked(addr, Some(mesh_common::names::DELIVERY_MARK)).await
}

/// A TCP connection to `addr` with `SO_MARK` `mark`, if given.
pub async fn connect_marked(addr: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        crate::os::set_mark(socket.as_fd(), mark)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
