//! Captured connections of meshed pods, from the in-pod listener to their
//! destination (chosen by the kernel's load balancer, read from
//! `LW_CAPTURED`): through the tunnel to a meshed pod on another node,
//! straight to a meshed pod on this node (same checks, no TLS on the wire),
//! or unchanged, from the pod's own network namespace, to anything else.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use super::{
    identity::Identities,
    inbound::Inbound,
    splice::{SpliceOff, Unread, Watch, Watched},
    workloads::LocalWorkloads,
};
use crate::{
    model::workloads::Workload,
    pki,
    tunnel::{
        self, Peer,
        client::{Destination, Pool},
        metrics::TunnelMetrics,
    },
};

pub struct Outbound {
    pub workloads: Arc<LocalWorkloads>,
    pub identities: Arc<Identities>,
    pub inbound: Arc<Inbound>,
    pub pool: Pool,
    pub roots: Arc<rustls::RootCertStore>,
    pub trust_domain: String,
    pub metrics: TunnelMetrics,
    /// With acceleration: where the daemon switches off an app that writes
    /// faster than it can pass on.
    pub splice_off: Option<Arc<SpliceOff>>,
}

impl Outbound {
    /// Carries one captured connection until both sides are done.
    pub async fn handle(
        &self,
        source: Arc<Workload>,
        netns: Arc<File>,
        netns_cookie: u64,
        app: TcpStream,
        dest: SocketAddr,
    ) {
        let _ = app.set_nodelay(true);
        // The app's writes reach `app` spliced (when acceleration is on).
        let watch = Watch::on(self.splice_off.as_ref(), &app, netns_cookie);
        let source_ip = source
            .addresses
            .iter()
            .find(|a| a.is_ipv4() == dest.is_ipv4())
            .or(source.addresses.first())
            .copied();
        let Some(source_ip) = source_ip else { return };
        let identity = source.identity(&self.trust_domain);
        let peer = Peer {
            identity: identity.clone(),
            source: Some(source_ip),
        };
        if self.workloads.local(dest.ip()).is_some_and(|w| w.meshed) {
            // Same node: the destination's checks, no TLS on the wire.
            match self.inbound.connect(peer, dest).await {
                Ok(upstream) => {
                    splice_app(app, watch, upstream.stream, upstream.watch).await;
                }
                Err(refusal) => {
                    tracing::info!(%identity, %dest, reason = refusal.reason, detail = %refusal.detail, "same-node connection refused");
                    self.metrics.refused(&refusal);
                    reset(app);
                }
            }
        } else if let Some(to) = self.workloads.peer(dest.ip()) {
            match self.tunnel(&identity, source_ip, &to, dest).await {
                Ok(upgraded) => {
                    self.metrics.opened("outbound");
                    let tunnel = hyper_util::rt::TokioIo::new(upgraded);
                    let (up, down) = splice_app(app, watch, tunnel, None).await;
                    self.metrics.closed("outbound", up, down);
                }
                Err(err) => {
                    tracing::info!(%identity, %dest, node = %to.node, %err, "tunnel stream failed");
                    reset(app);
                }
            }
        } else {
            match connect_from(&netns, dest).await {
                Ok(upstream) => {
                    splice_app(app, watch, upstream, None).await;
                }
                Err(err) => {
                    tracing::debug!(%dest, %err, "passthrough connect failed");
                    reset(app);
                }
            }
        }
    }

    async fn tunnel(
        &self,
        identity: &str,
        source: IpAddr,
        to: &crate::model::workloads::PeerEntry,
        dest: SocketAddr,
    ) -> Result<hyper::upgrade::Upgraded, String> {
        let (svid, serial) = self
            .identities
            .get(identity)
            .ok_or_else(|| format!("no certificate for {identity} yet"))?;
        let destination = Destination {
            node: SocketAddr::new(to.node_address, tunnel::PORT),
            node_identity: pki::node_identity(&self.trust_domain, &to.node),
            pod: dest,
        };
        self.pool
            .open(
                &svid,
                &serial,
                std::sync::Arc::clone(&self.roots),
                source,
                &destination,
            )
            .await
            .map_err(|e| e.to_string())
    }
}

/// A connection to `dest` from inside the pod's network namespace, so the
/// destination sees the pod's own address; marked so it is not captured.
async fn connect_from(netns: &File, dest: SocketAddr) -> std::io::Result<TcpStream> {
    let fd = crate::sys::in_netns(netns.as_fd(), || {
        let fd = crate::sys::tcp_socket(dest.is_ipv6())?;
        crate::sys::set_mark(fd.as_fd(), crate::net::BYPASS_MARK)?;
        Ok(fd)
    })?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    tokio::time::timeout(Duration::from_secs(10), socket.connect(dest))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// Splices the app's connection with the other side; if the other side
/// resets, the app's connection is reset too (not closed cleanly). The
/// watches are on spliced writers into each side (the app's; a pod's here).
async fn splice_app<B>(
    mut app: TcpStream,
    app_watch: Option<Arc<Watch>>,
    other: B,
    other_watch: Option<Arc<Watch>>,
) -> (u64, u64)
where
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unread + Unpin,
{
    let mut other = Watched::new(other, other_watch.clone(), app_watch.clone());
    let mut app_side = Watched::new(&mut app, app_watch, other_watch);
    match tokio::io::copy_bidirectional_with_sizes(
        &mut app_side,
        &mut other,
        tunnel::COPY_BUFFER,
        tunnel::COPY_BUFFER,
    )
    .await
    {
        Ok(counts) => {
            tracing::debug!(up = counts.0, down = counts.1, "connection done");
            counts
        }
        Err(err) => {
            tracing::debug!(%err, "connection reset");
            drop(app_side);
            reset(app);
            (0, 0)
        }
    }
}

/// Closes with RST: the app sees the connection fail, not end.
fn reset(app: TcpStream) {
    let _ = app.set_zero_linger();
    drop(app);
}
