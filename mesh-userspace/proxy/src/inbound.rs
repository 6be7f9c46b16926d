//! Streams arriving for a pod on this node (through the tunnel, or from a
//! meshed pod on the same node): check who is asking, authorize, connect,
//! and carry the bytes while the connection stays allowed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::FutureExt as _;
use lacewing_core::model::{authorization, routes::Limited, workloads::Workload};
use lacewing_tunnel::{
    Peer, Refusal,
    metrics::TunnelMetrics,
    server::{Carry, TunnelStream},
};
use tokio::net::TcpStream;

use crate::{
    registry::{Direction, Registered, Registry},
    sockets::SocketFactory,
    splice::{End, Watch, Watched, pipe, reset},
    state::StateView,
};

/// How long a stream from a source address no workload has yet waits for
/// the control plane to send it: a pod's address reaches the API server
/// only after its network is up, and its first connection may come sooner.
const UNKNOWN_SOURCE_WAIT: Duration = Duration::from_secs(5);

pub struct Inbound {
    pub state: Arc<dyn StateView>,
    pub sockets: Arc<dyn SocketFactory>,
    pub registry: Arc<Registry>,
    pub trust_domain: String,
    /// Where refused requests are counted.
    pub metrics: TunnelMetrics,
    /// Where decided requests are counted.
    pub requests: crate::metrics::RequestMetrics,
    /// The rate limits of pods here (TrafficPolicies').
    pub limits: crate::ratelimit::RateLimits,
    pub telemetry: crate::telemetry::Telemetry,
}

/// A connection to a pod here, the watch on the pod's writes into it
/// (spliced when acceleration is on), and its place in the registry.
pub struct Delivery {
    pub stream: TcpStream,
    pub watch: Option<Arc<Watch>>,
    pub registered: Registered,
    /// Whether its HTTP requests are decided one by one (an
    /// AuthorizationPolicy with L7 conditions selects the pod).
    pub per_request: bool,
    pub peer: Peer,
    pub dest: SocketAddr,
}

impl Inbound {
    /// Authorizes `peer`'s stream to `dest`, connects to the pod and
    /// registers the connection (so a policy change can close it).
    pub async fn connect(&self, peer: Peer, dest: SocketAddr) -> Result<Delivery, Refusal> {
        let workload = match self.authorize(&peer, dest) {
            Err(refusal) if self.source_unknown(&peer) => {
                self.authorize_when_known(&peer, dest, refusal).await?
            }
            decided => decided?,
        };
        let routes = self.state.routes();
        let limited = routes.limited(dest);
        // A port not declared HTTP is limited per connection.
        if let Some(l) = limited.filter(|l| !l.per_request) {
            self.take(&peer, dest, l)?;
        }
        let per_request = self.reads_requests(&workload, limited);
        let stream = self
            .sockets
            .connect_delivery(dest)
            .await
            .map_err(|e| Refusal::new(503, "connect_failed", format!("{dest}: {e}")))?;
        let watch = self.sockets.watch(&stream, 0);
        let registered = self
            .registry
            .register(peer.clone(), dest, Direction::Inbound);
        if per_request {
            self.registry.set_per_request(&registered);
        }
        Ok(Delivery {
            stream,
            watch,
            registered,
            per_request,
            peer,
            dest,
        })
    }

    /// Whether the stream's source address belongs to no workload yet.
    fn source_unknown(&self, peer: &Peer) -> bool {
        peer.source.is_some_and(|s| self.state.peer(s).is_none())
    }

    /// Decides again on each configuration change until the source is
    /// known, for up to [`UNKNOWN_SOURCE_WAIT`]; an address that is still
    /// no workload's after that gets the first `refusal`. The source must
    /// still prove the identity the control plane gives that address.
    async fn authorize_when_known(
        &self,
        peer: &Peer,
        dest: SocketAddr,
        refusal: Refusal,
    ) -> Result<Arc<Workload>, Refusal> {
        let mut changes = self.state.config_changes();
        let deadline = tokio::time::Instant::now() + UNKNOWN_SOURCE_WAIT;
        while self.source_unknown(peer) {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(refusal),
            }
        }
        self.authorize(peer, dest)
    }

    /// The checks, without connecting: the destination is a meshed pod here;
    /// the source address belongs to a workload with the identity the peer
    /// proved; the AuthorizationPolicies selecting the pod allow it.
    pub fn authorize(&self, peer: &Peer, dest: SocketAddr) -> Result<Arc<Workload>, Refusal> {
        self.decide(peer, dest, None)
    }

    fn decide(
        &self,
        peer: &Peer,
        dest: SocketAddr,
        request: Option<&authorization::Request<'_>>,
    ) -> Result<Arc<Workload>, Refusal> {
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
        authorization::decide(
            &self.state.policies(),
            &workload,
            dest.port(),
            &source,
            request,
        )
        .map_err(|denied| Refusal {
            status: 403,
            reason: "policy_denied",
            detail: denied.reason,
            policy: Some(denied.policy),
            retry_after: None,
        })?;
        Ok(workload)
    }

    /// Whether requests to `workload` at `dest` are read one by one: an
    /// AuthorizationPolicy with L7 conditions selects it, or a rate limit
    /// applies to it per request.
    pub fn per_request(&self, workload: &Workload, dest: SocketAddr) -> bool {
        self.reads_requests(workload, self.state.routes().limited(dest))
    }

    /// [`per_request`](Self::per_request), given the rate limit of the
    /// destination.
    fn reads_requests(&self, workload: &Workload, limited: Option<&Limited>) -> bool {
        authorization::needs_requests(&self.state.policies(), workload)
            || limited.is_some_and(|l| l.per_request)
    }

    /// One request (or connection) to `dest` taken from its rate limit, or
    /// the refusal (429, with when to come back).
    fn take(&self, peer: &Peer, dest: SocketAddr, limited: &Limited) -> Result<(), Refusal> {
        let Some(config) = &limited.policy.rate_limit else {
            return Ok(());
        };
        self.limits
            .check(dest, config, &peer.identity)
            .map_err(|wait| {
                let service = format!("{}/{}", limited.service.0, limited.service.1);
                self.requests.event(&service, "rate_limited");
                Refusal {
                    status: 429,
                    reason: "rate_limited",
                    detail: format!("{dest}: over the rate limit of {service}"),
                    policy: Some(limited.policy.policy.clone()),
                    retry_after: Some(wait),
                }
            })
    }

    /// The tunnel server's connector: authorize and connect, then carry the
    /// upgraded stream to the pod.
    pub fn connector(self: &Arc<Self>) -> lacewing_tunnel::server::Connector {
        let inbound = Arc::clone(self);
        Arc::new(move |peer, dest| {
            let inbound = Arc::clone(&inbound);
            async move {
                let started = std::time::SystemTime::now();
                let delivery = match inbound.connect(peer.clone(), dest).await {
                    Ok(delivery) => delivery,
                    Err(refusal) => {
                        inbound.log_connection(&peer, dest, started, Err(&refusal));
                        return Err(refusal);
                    }
                };
                let carry: Carry = Box::new(move |tunnel| {
                    async move {
                        if delivery.per_request {
                            // Its requests are logged one by one.
                            inbound.serve_requests(tunnel, None, delivery).await
                        } else {
                            let carried = carry(tunnel, delivery).await;
                            inbound.log_connection(&peer, dest, started, Ok(carried));
                            carried
                        }
                    }
                    .boxed()
                });
                Ok(carry)
            }
            .boxed()
        })
    }
}

impl Inbound {
    /// The access log line of a tunnel stream for a pod here: the bytes it
    /// carried each way, or why it was refused.
    fn log_connection(
        &self,
        peer: &Peer,
        dest: SocketAddr,
        started: std::time::SystemTime,
        outcome: Result<(u64, u64), &Refusal>,
    ) {
        let pod = self.state.local(dest.ip());
        let Some(log) = self.telemetry.log_for(pod.as_deref()) else {
            return;
        };
        let mut e = crate::telemetry::access_log::Entry::new("connection", "inbound", started);
        if let Some(pod) = &pod {
            e = e.to_workload(pod, &self.trust_domain);
        }
        e.source_namespace = crate::metrics::namespace_of(&peer.identity).map(str::to_owned);
        e.source_identity = Some(peer.identity.clone());
        e.source_address = peer.source.map(|a| a.to_string());
        e.destination_address = Some(dest.to_string());
        e.path_taken = Some("tunnel");
        match outcome {
            Ok((up, down)) => {
                e.bytes_sent = Some(up);
                e.bytes_received = Some(down);
            }
            Err(refusal) => {
                e.reason = Some(refusal.reason.to_owned());
                e.policy = refusal.policy.clone();
            }
        }
        log.write(&e);
    }

    /// Serves a delivery whose requests are decided one by one
    /// ([`crate::l7`]), from `client` (whose spliced writes `client_watch`
    /// watches, for a same-node app); the bytes read from each side.
    pub async fn serve_requests<C>(
        self: &Arc<Self>,
        client: C,
        client_watch: Option<Arc<Watch>>,
        delivery: Delivery,
    ) -> (u64, u64)
    where
        C: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + crate::splice::Unread
            + Unpin
            + Send
            + 'static,
    {
        let Delivery {
            stream,
            watch,
            registered,
            peer,
            dest,
            ..
        } = delivery;
        crate::l7::serve(
            client,
            client_watch,
            stream,
            watch,
            peer,
            dest,
            Arc::clone(self) as Arc<dyn crate::l7::PodSide>,
            self.metrics.clone(),
            self.state.local(dest.ip()).map(|pod| crate::l7::Requests {
                metrics: self.requests.clone(),
                pod,
                telemetry: self.telemetry.clone(),
                trust_domain: self.trust_domain.clone(),
            }),
            &registered.closed,
        )
        .await
    }
}

impl crate::l7::PodSide for Inbound {
    fn decide_request(
        &self,
        peer: &Peer,
        dest: SocketAddr,
        request: &authorization::Request<'_>,
    ) -> Result<(), Refusal> {
        // The same checks as the connection's, with the request's method,
        // path and headers; then the rate limit.
        self.decide(peer, dest, Some(request))?;
        match self.state.routes().limited(dest).filter(|l| l.per_request) {
            Some(limited) => self.take(peer, dest, limited),
            None => Ok(()),
        }
    }

    fn reconnect(
        &self,
        dest: SocketAddr,
    ) -> futures::future::BoxFuture<'static, std::io::Result<crate::l7::PodConnection>> {
        let connecting = self.sockets.connect_delivery(dest);
        let sockets = Arc::clone(&self.sockets);
        Box::pin(async move {
            let stream = connecting.await?;
            let watch = sockets.watch(&stream, 0);
            Ok((stream, watch))
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
        ..
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
