//! The node's [`SocketFactory`]: sockets opened in a pod's network
//! namespace (entered and left on the calling thread), marked so the kernel
//! programs leave them alone, and watched when the hop is spliced.

use std::{io, net::SocketAddr, os::fd::AsFd as _, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use lacewing_proxy::{
    sockets::{PodNetns, SocketFactory},
    splice::Watch,
};
use lacewing_sys::{net, os};
use tokio::net::{TcpSocket, TcpStream};

use super::splice::{self, SpliceOff};

/// How long a pass-through connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct NodeSockets {
    /// With acceleration: where the daemon switches off a writer that
    /// writes faster than it can pass on.
    pub splice_off: Option<Arc<SpliceOff>>,
}

impl SocketFactory for NodeSockets {
    fn connect_from(
        &self,
        netns: &PodNetns,
        dest: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        // The socket is made in the pod's namespace, now, on this thread;
        // connecting it needs no namespace.
        let socket = os::in_netns(netns.as_fd(), || {
            let fd = os::tcp_socket(dest.is_ipv6())?;
            os::set_mark(fd.as_fd(), net::BYPASS_MARK)?;
            Ok(fd)
        });
        Box::pin(async move {
            let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket?));
            tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dest))
                .await
                .map_err(|_| io::ErrorKind::TimedOut)?
        })
    }

    fn connect_delivery(&self, dest: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(net::connect_delivery(dest))
    }

    fn watch(&self, socket: &TcpStream, netns_cookie: u64) -> Option<Arc<Watch>> {
        splice::watch(self.splice_off.as_ref(), socket, netns_cookie)
    }
}
