//! Streams arriving for a pod on this node (through the tunnel, or from a
//! meshed pod on the same node): check who is asking, authorize, connect,
//! and carry the bytes while the connection stays allowed.

use std::{net::SocketAddr, sync::Arc};

use futures::FutureExt as _;
use lacewing_core::model::{authorization, workloads::Workload};
use lacewing_tunnel::{
    Peer, Refusal,
    server::{Carry, TunnelStream},
};
use tokio::net::TcpStream;

use crate::{
    registry::{Direction, Registered, Registry},
    sockets::SocketFactory,
    splice::{End, Watch, Watched, pipe, reset},
    state::StateView,
};

pub struct Inbound {
    pub state: Arc<dyn StateView>,
    pub sockets: Arc<dyn SocketFactory>,
    pub registry: Arc<Registry>,
    pub trust_domain: String,
}

/// A connection to a pod here, the watch on the pod's writes into it
/// (spliced when acceleration is on), and its place in the registry.
pub struct Delivery {
    pub stream: TcpStream,
    pub watch: Option<Arc<Watch>>,
    pub registered: Registered,
}

impl Inbound {
    /// Authorizes `peer`'s stream to `dest`, connects to the pod and
    /// registers the connection (so a policy change can close it).
    pub async fn connect(&self, peer: Peer, dest: SocketAddr) -> Result<Delivery, Refusal> {
        self.authorize(&peer, dest)?;
        let stream = self
            .sockets
            .connect_delivery(dest)
            .await
            .map_err(|e| Refusal::new(503, "connect_failed", format!("{dest}: {e}")))?;
        let watch = self.sockets.watch(&stream, 0);
        let registered = self.registry.register(peer, dest, Direction::Inbound);
        Ok(Delivery {
            stream,
            watch,
            registered,
        })
    }

    /// The checks, without connecting: the destination is a meshed pod here;
    /// the source address belongs to a workload with the identity the peer
    /// proved; the AuthorizationPolicies selecting the pod allow it.
    pub fn authorize(&self, peer: &Peer, dest: SocketAddr) -> Result<Arc<Workload>, Refusal> {
        let workload = match self.state.local(dest.ip()) {
            Some(w) if w.meshed => w,
            Some(_) => {
                return Err(Refusal::new(
                    403,
                    "destination_not_meshed",
                    format!("{dest} is not in the mesh"),
                ));
            }
            None => {
                return Err(Refusal::new(
                    404,
                    "unknown_destination",
                    format!("no pod {} on this node", dest.ip()),
                ));
            }
        };
        let Some(source) = peer.source else {
            return Err(Refusal::new(
                403,
                "no_source",
                "the stream names no source pod",
            ));
        };
        let claimed = self
            .state
            .peer(source)
            .map(|p| p.identity(&self.trust_domain));
        if claimed.as_deref() != Some(peer.identity.as_str()) {
            return Err(Refusal::new(
                403,
                "identity_mismatch",
                format!(
                    "the certificate says {} but source {source} is {}",
                    peer.identity,
                    claimed.as_deref().unwrap_or("no meshed workload")
                ),
            ));
        }
        let source = authorization::Source {
            identity: &peer.identity,
        };
        authorization::decide(&self.state.policies(), &workload, dest.port(), &source).map_err(
            |denied| Refusal {
                status: 403,
                reason: "policy_denied",
                detail: denied.reason,
                policy: Some(denied.policy),
            },
        )?;
        Ok(workload)
    }

    /// The tunnel server's connector: authorize and connect, then carry the
    /// upgraded stream to the pod.
    pub fn connector(self: &Arc<Self>) -> lacewing_tunnel::server::Connector {
        let inbound = Arc::clone(self);
        Arc::new(move |peer, dest| {
            let inbound = Arc::clone(&inbound);
            async move {
                let delivery = inbound.connect(peer, dest).await?;
                let carry: Carry = Box::new(move |tunnel| carry(tunnel, delivery).boxed());
                Ok(carry)
            }
            .boxed()
        })
    }
}

/// Moves a tunnel stream's bytes to and from the pod until both are done
/// or the registry closes the connection (then the pod's side is reset and
/// the stream dropped, which resets it at the source too).
async fn carry(tunnel: TunnelStream, delivery: Delivery) -> (u64, u64) {
    let Delivery {
        stream,
        watch,
        registered,
    } = delivery;
    // The pod's spliced writes are watched: its replies must not outrun
    // the tunnel.
    let mut tunnel = Watched::new(tunnel, None, watch.clone());
    let mut pod = Watched::new(stream, watch, None);
    let end = pipe(&mut tunnel, &mut pod, &registered.closed).await;
    let carried = (tunnel.bytes_read(), pod.bytes_read());
    if end != End::Done {
        reset(pod.into_inner());
    }
    carried
}

#[cfg(test)]
mod tests;
