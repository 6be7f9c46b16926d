//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's
//! leaderelection does it: every replica serves nodes, only the leader
//! writes status. A replica takes the Lease when it is free or when its
//! holder has not renewed it for a whole lease duration, measured on this
//! replica's own clock from when it last saw the record change (so clock
//! skew between replicas does not matter). Writes carry the Lease's
//! resourceVersion, so of two replicas racing for it exactly one wins.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    chrono::Utc,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a holder keeps the Lease without renewing it.
    pub duration: Duration,
    /// How often the holder renews (and others check).
    pub retry: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 2 s retry.
    pub fn new(namespace: String, identity: String) -> Self {
        Self {
            namespace,
            name: "lacewing-controller".to_owned(),
            identity,
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

/// The last Lease record seen and when it was first seen.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

/// Campaigns for the Lease until the task is dropped; the receiver says
/// whether this replica leads. A leader that cannot renew for two thirds of
/// the lease duration steps down before anyone else can take over.
pub fn elect(
    client: Client,
    config: LeaseConfig,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let api = Api::<Lease>::namespaced(client, &config.namespace);
        let mut observed: Option<Observed> = None;
        let mut renewed = Instant::now();
        let mut interval = tokio::time::interval(config.retry);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let leads = match try_acquire_or_renew(&api, &config, &mut observed).await {
                Ok(leads) => {
                    if leads {
                        renewed = Instant::now();
                    }
                    leads
                }
                Err(err) => {
                    tracing::warn!(%err, lease = %config.name, "leader election: cannot reach the Lease");
                    *tx.borrow() && renewed.elapsed() < config.duration * 2 / 3
                }
            };
            tx.send_if_modified(|was| {
                if *was != leads {
                    tracing::info!(identity = %config.identity, leads, "leadership changed");
                }
                std::mem::replace(was, leads) != leads
            });
        }
    });
    (rx, task)
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Utc::now());
    let seconds = i32::try_from(config.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return won(api.create(&PostParams::default(), &lease).await);
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != spec.holder_identity || o.renew_time != spec.renew_time);
    if changed {
        *observed = Some(Observed {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.clone(),
            at: Instant::now(),
        });
    }
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.at.elapsed() > config.duration);
    if !(mine || free || expired) {
        return Ok(false);
    }
    if !mine {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.holder_identity = Some(config.identity.clone());
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(seconds);
    // Carries the resourceVersion read above: a concurrent writer makes this fail.
    won(api
        .replace(&config.name, &PostParams::default(), &lease)
        .await)
}

/// A write that lost a race (409 Conflict) is not an error: someone else leads.
fn won(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
