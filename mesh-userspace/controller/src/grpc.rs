//! The `ConfigService` gRPC server: one stream per node, versioned deltas, one
//! update in flight per node, and a record of what each node applied.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::snapshot::{Snapshot, Snapshots};
use lacewing_core::pki;
use lacewing_core::proto::pb::{
    self, NodeMessage,
    config_service_server::{ConfigService, ConfigServiceServer},
    node_message::Kind,
};

/// Full snapshots in flight at once. Each is the whole service set (about
/// 2.5 MB encoded at 10,000 services); deltas are not limited.
const FULL_SYNCS_AT_ONCE: usize = 16;

/// What the controller knows of one node.
#[derive(Clone, Debug, Default)]
struct NodeRecord {
    /// The snapshot the node last acknowledged: the base of its next delta.
    applied: Option<Arc<Snapshot>>,
    connected: bool,
    last_nack_version: u64,
    last_nack: String,
}

/// Shared state of all streams.
pub struct Registry {
    trust_domain: String,
    /// Permits for full snapshots in flight (sent, not yet acknowledged).
    full_syncs: tokio::sync::Semaphore,
    snapshots: Snapshots,
    source_error: watch::Receiver<String>,
    nodes: Mutex<BTreeMap<String, NodeRecord>>,
    /// Subscriptions refused, by reason (`lacewing_controller_subscriptions_refused`).
    pub refused: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// One node as `/status` and the metrics show it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub applied_version: u64,
    pub connected: bool,
    pub last_nack_version: u64,
    pub last_nack: String,
}

/// The controller's `/status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ControllerStatus {
    /// The configuration version the source is at (0 before its first load).
    pub version: u64,
    /// The source's last error; the last good configuration stays in force.
    pub source_error: String,
    pub nodes: Vec<NodeStatus>,
}

impl Registry {
    pub fn new(
        trust_domain: String,
        snapshots: Snapshots,
        source_error: watch::Receiver<String>,
    ) -> Self {
        Self {
            trust_domain,
            snapshots,
            source_error,
            nodes: Mutex::new(BTreeMap::new()),
            full_syncs: tokio::sync::Semaphore::new(FULL_SYNCS_AT_ONCE),
            refused: Family::default(),
        }
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut NodeRecord)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        f(nodes.entry(node.to_owned()).or_default());
    }

    fn record(&self, node: &str) -> NodeRecord {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    /// Every node's applied version and last NACK.
    pub fn status(&self) -> ControllerStatus {
        let nodes = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, r)| NodeStatus {
                node: name.clone(),
                applied_version: r.applied.as_ref().map_or(0, |s| s.version),
                connected: r.connected,
                last_nack_version: r.last_nack_version,
                last_nack: r.last_nack.clone(),
            })
            .collect();
        ControllerStatus {
            version: self.snapshots.borrow().as_ref().map_or(0, |s| s.version),
            source_error: self.source_error.borrow().clone(),
            nodes,
        }
    }
}

/// The tonic service over a registry.
pub fn server(registry: Arc<Registry>) -> ConfigServiceServer<Server> {
    ConfigServiceServer::new(Server(registry))
}

pub struct Server(Arc<Registry>);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigService for Server {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let certified = certified_node(&request, &self.0.trust_domain)?;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.kind) {
            Some(Kind::Hello(hello)) if !hello.node.is_empty() => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be Hello with the node's name",
                ));
            }
        };
        if hello.node != certified {
            tracing::warn!(certificate = %certified, claimed = %hello.node, "refused a node subscribing under another node's name");
            self.0
                .refused
                .get_or_create(&ReasonLabels {
                    reason: "node_mismatch",
                })
                .inc();
            return Err(Status::permission_denied(format!(
                "the certificate of node {certified} cannot subscribe as node {}",
                hello.node
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let registry = Arc::clone(&self.0);
        tokio::spawn(async move {
            let node = hello.node.clone();
            tracing::info!(%node, version = hello.version, "node subscribed");
            registry.update(&node, |r| r.connected = true);
            if let Err(reason) = session(&registry, &hello, &mut inbound, &tx).await {
                tracing::info!(%node, %reason, "node stream ended");
            }
            registry.update(&node, |r| r.connected = false);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The node a request comes from: the name in its client certificate, never
/// what the request says.
#[allow(
    clippy::result_large_err,
    reason = "tonic handlers return Status as it is"
)]
pub fn certified_node<T>(request: &Request<T>, trust_domain: &str) -> Result<String, Status> {
    request
        .peer_certs()
        .and_then(|certs| certs.first().map(|c| pki::uri_sans(c)))
        .unwrap_or_default()
        .iter()
        .find_map(|uri| pki::node_of_identity(trust_domain, uri))
        .ok_or_else(|| Status::unauthenticated("no node identity in the client certificate"))
}

/// Why a node's stream ended other than by the node closing it.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("the configuration source stopped (the controller is shutting down)")]
    SourceStopped,
    #[error("the controller is shutting down")]
    ShuttingDown,
    #[error("the node hung up")]
    HungUp,
    #[error("the node's stream failed: {0}")]
    Node(Box<Status>),
    #[error("the node sent {got} where an Ack or Nack of version {version} belongs")]
    Unexpected { version: u64, got: String },
}

/// Sends the node what it lacks, one update at a time, until the stream ends.
async fn session(
    registry: &Registry,
    hello: &pb::Hello,
    inbound: &mut Streaming<NodeMessage>,
    tx: &mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
) -> Result<(), SessionError> {
    let node = hello.node.as_str();
    // A delta needs a base both sides agree on: what this controller saw the
    // node acknowledge, if the node says it still has exactly that.
    let mut base = registry
        .record(node)
        .applied
        .filter(|s| s.version == hello.version);
    let mut snapshots = registry.snapshots.clone();
    loop {
        let latest = snapshots.borrow_and_update().clone();
        let Some(latest) = latest.filter(|l| base.as_ref().map(|b| b.version) != Some(l.version))
        else {
            // Nothing new: wait for a change, or for the node to go away.
            tokio::select! {
                changed = snapshots.changed() => changed.map_err(|_| SessionError::SourceStopped)?,
                msg = inbound.message() => match msg {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(SessionError::Node(Box::new(status))),
                },
            }
            continue;
        };
        // Full snapshots are large (every service); building and sending too
        // many at once (a fleet reconnecting) would hold them all in memory,
        // so the permit is taken before the message is built.
        let _permit = if base.is_none() {
            Some(
                registry
                    .full_syncs
                    .acquire()
                    .await
                    .map_err(|_| SessionError::ShuttingDown)?,
            )
        } else {
            None
        };
        let update = latest.update_for(node, base.as_deref());
        for chunk in lacewing_core::proto::chunks::split(update) {
            tx.send(Ok(chunk)).await.map_err(|_| SessionError::HungUp)?;
        }
        match inbound
            .message()
            .await
            .map_err(|s| SessionError::Node(Box::new(s)))?
            .and_then(|m| m.kind)
        {
            Some(Kind::Ack(ack)) if ack.version == latest.version => {
                registry.update(node, |r| r.applied = Some(Arc::clone(&latest)));
                base = Some(latest);
            }
            Some(Kind::Nack(nack)) => {
                tracing::warn!(%node, version = nack.version, error = %nack.error, "node rejected an update; it keeps its previous configuration");
                registry.update(node, |r| {
                    r.last_nack_version = nack.version;
                    r.last_nack = nack.error.clone();
                });
                // Retrying the same update would fail the same way: wait for
                // the next change, then send a delta from what the node has.
                snapshots
                    .changed()
                    .await
                    .map_err(|_| SessionError::SourceStopped)?;
            }
            Some(other) => {
                return Err(SessionError::Unexpected {
                    version: latest.version,
                    got: format!("{other:?}"),
                });
            }
            None => return Ok(()),
        }
    }
}
