//! Sockets the node daemon opens itself. They carry [`BYPASS_MARK`], which
//! the kernel programs leave alone: the daemon's own connections (to a
//! tunnel peer, to a destination pod) must never be captured back into it.

use std::{net::SocketAddr, os::fd::AsFd as _};

use tokio::net::{TcpSocket, TcpStream};

/// `SO_MARK` of the daemon's sockets ("LW"), as Istio marks its proxy's
/// sockets 1337.
pub const BYPASS_MARK: u32 = mesh_common::names::BYPASS_MARK;

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
