//! Streams arriving for a pod on this node (through the tunnel, or from a
//! meshed pod on the same node): check who is asking, authorize, connect.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    splice::{SpliceOff, Watch},
    workloads::LocalWorkloads,
};
use crate::{
    model::authorization,
    tunnel::{Peer, Refusal},
};

pub struct Inbound {
    pub workloads: Arc<LocalWorkloads>,
    pub trust_domain: String,
    /// With acceleration: where the daemon switches off a pod that writes
    /// faster than it can pass on.
    pub splice_off: Option<Arc<SpliceOff>>,
}

/// A connection to a pod here, and the watch on the pod's writes into it
/// (spliced when acceleration is on).
pub struct Delivery {
    pub stream: TcpStream,
    pub watch: Option<Arc<Watch>>,
}

impl Inbound {
    /// Authorizes `peer`'s stream to `dest` and connects to the pod.
    pub async fn connect(&self, peer: Peer, dest: SocketAddr) -> Result<Delivery, Refusal> {
        self.authorize(&peer, dest)?;
        let stream = crate::net::connect_delivery(dest)
            .await
            .map_err(|e| Refusal::new(503, "connect_failed", format!("{dest}: {e}")))?;
        let watch = Watch::on(self.splice_off.as_ref(), &stream, 0);
        Ok(Delivery { stream, watch })
    }

    /// The checks, without connecting: the destination is a meshed pod here;
    /// the source address belongs to a workload with the identity the peer
    /// proved; the AuthorizationPolicies selecting the pod allow it.
    pub fn authorize(&self, peer: &Peer, dest: SocketAddr) -> Result<(), Refusal> {
        let workload = match self.workloads.local(dest.ip()) {
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
            .workloads
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
        authorization::decide(&self.workloads.policies(), &workload, dest.port(), &source).map_err(
            |denied| Refusal {
                status: 403,
                reason: "policy_denied",
                detail: denied.reason,
                policy: Some(denied.policy),
            },
        )
    }
}
