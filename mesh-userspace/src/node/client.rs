//! The node's side of the configuration stream: subscribe to the controller,
//! apply each update to the kernel maps, ACK or NACK it, and reconnect with
//! jittered backoff. Whatever happens to the controller, the maps keep the
//! last good configuration.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{http::Endpoint, lb::LoadBalancer, metrics::Metrics};
use crate::{
    controller::snapshot::FrontendKey,
    model::services::{ServiceEntry, ServiceSet},
    proto::{
        self,
        pb::{self, config_service_client::ConfigServiceClient, node_message::Kind},
    },
};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the node has applied: the version and the services it stands for.
#[derive(Debug, Default)]
struct Applied {
    version: u64,
    services: BTreeMap<FrontendKey, ServiceEntry>,
}

/// Runs forever: subscribe, apply, reconnect.
pub async fn run(
    controller: String,
    node: String,
    lb: Arc<Mutex<LoadBalancer>>,
    metrics: Metrics,
    endpoint: Arc<Endpoint>,
) {
    let mut applied = Applied::default();
    let mut backoff = BACKOFF_MIN;
    loop {
        match session(&controller, &node, &mut applied, &lb, &metrics, &endpoint).await {
            Ok(got_updates) if got_updates => backoff = BACKOFF_MIN,
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%controller, %err, "configuration stream lost; keeping the last good configuration")
            }
        }
        tokio::time::sleep(backoff.mul_f64(jitter())).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    controller: &str,
    node: &str,
    applied: &mut Applied,
    lb: &Mutex<LoadBalancer>,
    metrics: &Metrics,
    endpoint: &Endpoint,
) -> Result<bool, String> {
    let mut client = ConfigServiceClient::connect(controller.to_owned())
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        node: node.to_owned(),
        version: applied.version,
    };
    tx.send(pb::NodeMessage {
        kind: Some(Kind::Hello(hello)),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut updates = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    tracing::info!(%controller, version = applied.version, "subscribed");
    let mut got = false;
    while let Some(update) = updates.message().await.map_err(|e| e.to_string())? {
        got = true;
        let reply = match apply(applied, &update, lb) {
            Ok(()) => {
                tracing::info!(
                    version = update.version,
                    upserts = update.upserts.len(),
                    removes = update.removes.len(),
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
                    error,
                })
            }
        };
        metrics.applied(matches!(reply, Kind::Ack(_)));
        tx.send(pb::NodeMessage { kind: Some(reply) })
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(got)
}

/// Applies one update on top of what the node has; on error nothing changes.
fn apply(
    applied: &mut Applied,
    update: &pb::ConfigUpdate,
    lb: &Mutex<LoadBalancer>,
) -> Result<(), String> {
    let mut next = if update.base_version == 0 {
        BTreeMap::new()
    } else if update.base_version == applied.version {
        applied.services.clone()
    } else {
        return Err(format!(
            "delta on top of version {} but this node has {}",
            update.base_version, applied.version
        ));
    };
    for key in &update.removes {
        next.remove(&proto::key_from(key).map_err(|e| e.to_string())?);
    }
    for s in &update.upserts {
        let entry = ServiceEntry::try_from(s).map_err(|e| e.to_string())?;
        next.insert((entry.frontend, entry.protocol), entry);
    }
    let set = ServiceSet {
        services: next.values().cloned().collect(),
    };
    lb.lock()
        .unwrap_or_else(|p| p.into_inner())
        .apply(&set)
        .map_err(|e| e.to_string())?;
    *applied = Applied {
        version: update.version,
        services: next,
    };
    Ok(())
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
