//! Where the proxy's sockets come from. The node's factory enters pod
//! network namespaces, sets the marks the kernel programs look for, and
//! watches spliced writers; a test's factory connects plainly. The proxy
//! itself makes no system call of its own.

use std::{fs::File, io, net::SocketAddr, sync::Arc};

use futures::future::BoxFuture;
use tokio::net::TcpStream;

use crate::splice::Watch;

/// An open network namespace of a meshed pod.
pub type PodNetns = Arc<File>;

pub trait SocketFactory: Send + Sync + 'static {
    /// A connection to `dest` from inside the pod's network namespace, so
    /// the destination sees the pod's own address; never captured again.
    fn connect_from(
        &self,
        netns: &PodNetns,
        dest: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>>;

    /// A connection to a pod on this node, for delivery: not captured, and
    /// spliced with the pod's socket when acceleration is on.
    fn connect_delivery(&self, dest: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;

    /// The watch on the spliced writer at the other end of `socket`
    /// (`netns_cookie` for loopback hops); `None` without acceleration.
    fn watch(&self, socket: &TcpStream, netns_cookie: u64) -> Option<Arc<Watch>>;
}
