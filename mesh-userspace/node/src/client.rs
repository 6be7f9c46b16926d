//! The node's side of the configuration stream: subscribe to the controller
//! over mutual TLS, apply each update to the kernel maps, ACK or NACK it, and
//! reconnect with jittered backoff. Whatever happens to the controller, the
//! maps keep the last good configuration.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{config::Controller, lb::LoadBalancer, metrics::Metrics, workloads::LocalWorkloads};
use lacewing_core::model::services::FrontendKey;
use lacewing_core::model::{
    routes::RouteTable,
    services::{Protocol, ServiceEntry, ServiceSet, svc_key},
};
use lacewing_core::proto::{
    self,
    pb::{self, config_service_client::ConfigServiceClient, node_message::Kind},
};
use lacewing_sys::http::Endpoint;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why the configuration stream stopped (the node keeps its configuration
/// and reconnects).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Channel(#[from] super::channel::ChannelError),
    #[error("the controller refused the stream: {0}")]
    Refused(String),
    #[error("the stream broke: {0}")]
    Broken(String),
    #[error(transparent)]
    Pieces(#[from] lacewing_core::proto::chunks::ChunkError),
}

/// Why an update cannot be applied: the NACK's text, and nothing changes.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(
        "delta on top of version {base} but this node has {have}: the controller must send a full update"
    )]
    Base { base: u64, have: u64 },
    #[error(transparent)]
    Message(#[from] proto::BadMessage),
    #[error(transparent)]
    Apply(#[from] super::lb::ApplyError),
}

/// What the node has applied: the version and the services it stands for.
#[derive(Debug, Default)]
struct Applied {
    version: u64,
    services: BTreeMap<FrontendKey, ServiceEntry>,
}

/// Runs forever: subscribe, apply, reconnect.
pub async fn run(
    controller: Controller,
    node: String,
    lb: Arc<Mutex<LoadBalancer>>,
    workloads: Arc<LocalWorkloads>,
    metrics: Metrics,
    endpoint: Arc<Endpoint>,
) {
    let mut applied = Applied::default();
    let mut backoff = BACKOFF_MIN;
    let dest = Destinations {
        lb: &lb,
        workloads: &workloads,
        node: &node,
    };
    loop {
        match session(&controller, &dest, &mut applied, &metrics, &endpoint).await {
            Ok(true) => backoff = BACKOFF_MIN,
            Ok(false) => {}
            Err(err) => tracing::warn!(
                controller = %controller.url,
                %err,
                "configuration stream lost; keeping the last good configuration"
            ),
        }
        tokio::time::sleep(backoff.mul_f64(jitter())).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One subscription; `Ok(true)` when it delivered at least one update.
async fn session(
    controller: &Controller,
    dest: &Destinations<'_>,
    applied: &mut Applied,
    metrics: &Metrics,
    endpoint: &Endpoint,
) -> Result<bool, StreamError> {
    let (tx, mut updates) = subscribe(controller, dest.node, applied.version).await?;
    tracing::info!(controller = %controller.url, version = applied.version, "subscribed");
    let mut got = false;
    let mut pending: Option<pb::ConfigUpdate> = None;
    while let Some(piece) = updates
        .message()
        .await
        .map_err(|e| StreamError::Broken(e.message().to_owned()))?
    {
        let Some(update) = lacewing_core::proto::chunks::assemble(&mut pending, piece)? else {
            continue;
        };
        got = true;
        let reply = match apply(applied, &update, dest) {
            Ok(()) => {
                tracing::info!(
                    version = update.version,
                    upserts = update.upserts.len(),
                    removes = update.removes.len(),
                    workload_upserts = update.workload_upserts.len(),
                    workload_removes = update.workload_removes.len(),
                    "update applied"
                );
                endpoint.ready.store(true, Ordering::Release);
                Kind::Ack(pb::Ack {
                    version: update.version,
                })
            }
            Err(error) => {
                tracing::error!(version = update.version, %error, "update rejected; keeping the previous configuration");
                Kind::Nack(pb::Nack {
                    version: update.version,
                    error: error.to_string(),
                })
            }
        };
        metrics.applied(matches!(reply, Kind::Ack(_)));
        tx.send(pb::NodeMessage { kind: Some(reply) })
            .await
            .map_err(|_| StreamError::Broken("the stream closed".to_owned()))?;
    }
    Ok(got)
}

/// Opens the stream: connects, says who the node is and what version it has.
/// Returns where to send ACKs and NACKs, and the updates.
pub async fn subscribe(
    controller: &Controller,
    node: &str,
    version: u64,
) -> Result<
    (
        mpsc::Sender<pb::NodeMessage>,
        tonic::Streaming<pb::ConfigUpdate>,
    ),
    StreamError,
> {
    let mut client = ConfigServiceClient::new(super::channel::connect(controller).await?);
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        node: node.to_owned(),
        version,
    };
    tx.send(pb::NodeMessage {
        kind: Some(Kind::Hello(hello)),
    })
    .await
    .map_err(|_| StreamError::Broken("the stream closed".to_owned()))?;
    let updates = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|e| StreamError::Refused(e.message().to_owned()))?
        .into_inner();
    Ok((tx, updates))
}

/// A factor in [0.5, 1.5): spreads a fleet's reconnects after a controller
/// restart so they do not arrive all at once.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    0.5 + f64::from(nanos % 1000) / 1000.0
}

/// Where an update goes.
struct Destinations<'a> {
    lb: &'a Mutex<LoadBalancer>,
    workloads: &'a LocalWorkloads,
    node: &'a str,
}

/// Applies one update on top of what the node has; on error nothing changes.
fn apply(
    applied: &mut Applied,
    update: &pb::ConfigUpdate,
    dest: &Destinations<'_>,
) -> Result<(), UpdateError> {
    let mut next = if update.base_version == 0 {
        BTreeMap::new()
    } else if update.base_version == applied.version {
        applied.services.clone()
    } else {
        return Err(UpdateError::Base {
            base: update.base_version,
            have: applied.version,
        });
    };
    for key in &update.removes {
        next.remove(&proto::key_from(key)?);
    }
    for s in &update.upserts {
        let entry = ServiceEntry::try_from(s)?;
        next.insert((entry.frontend, entry.protocol), entry);
    }
    // Workloads are checked before the maps change, so a bad one changes nothing.
    let mut workloads = dest.workloads.next(update, dest.node)?;
    let table = RouteTable::build(workloads.routes(), workloads.traffic(), next.values());
    let set = ServiceSet {
        services: next.values().cloned().collect(),
    };
    {
        let mut lb = dest.lb.lock().unwrap_or_else(|p| p.into_inner());
        lb.set_routed(
            table
                .frontends()
                .map(|(addr, _)| svc_key(*addr, Protocol::Tcp))
                .collect(),
        );
        lb.apply(&set)?;
    }
    workloads.table = Arc::new(table);
    dest.workloads.replace(workloads);
    *applied = Applied {
        version: update.version,
        services: next,
    };
    Ok(())
}
