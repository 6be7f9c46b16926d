//! The Kubernetes source: kube-rs watchers on Services and EndpointSlices
//! (re-listing after `410 Gone`, following bookmarks, as the watcher does),
//! feeding the same translation and snapshots as the folder source.

use std::collections::BTreeMap;

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::watcher::{self, Event},
};
use serde::Serialize;
use tokio::sync::watch;

use super::snapshot::{Publisher, Snapshots};
use crate::model::k8s::{Objects, translate_all};

/// The objects of one kind, by namespace and name, as the JSON the
/// translation reads (Kubernetes JSON is YAML too).
#[derive(Debug, Default)]
pub struct KindStore {
    objects: BTreeMap<(String, String), String>,
    /// Objects of a re-list in progress; swapped in at its end, so a re-list
    /// never shows a half-empty cluster.
    relist: Option<BTreeMap<(String, String), String>>,
    /// Whether a first full list has completed.
    pub ready: bool,
}

impl KindStore {
    /// Applies one watcher event; whether the store's contents changed.
    pub fn apply<K: Resource + Serialize>(&mut self, event: Event<K>) -> bool {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        let json = |o: &K| serde_json::to_string(o).unwrap_or_default();
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&o), json(&o));
                false
            }
            Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.ready = true;
                true
            }
            Event::Apply(o) => {
                self.objects.insert(key(&o), json(&o)).as_deref() != Some(json(&o).as_str())
            }
            Event::Delete(o) => self.objects.remove(&key(&o)).is_some(),
        }
    }

    fn add_to(&self, kind: &str, objects: &mut Objects) -> Result<(), String> {
        for ((ns, name), json) in &self.objects {
            objects
                .add_yaml(&format!("{kind} {ns}/{name}"), json)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Services and EndpointSlices seen so far.
#[derive(Debug, Default)]
pub struct Cluster {
    pub services: KindStore,
    pub slices: KindStore,
}

impl Cluster {
    /// The service set, once both kinds have been listed.
    pub fn translate(&self) -> Option<Result<crate::model::services::ServiceSet, String>> {
        if !(self.services.ready && self.slices.ready) {
            return None;
        }
        let mut objects = Objects::default();
        let built = self
            .services
            .add_to("Service", &mut objects)
            .and_then(|()| self.slices.add_to("EndpointSlice", &mut objects))
            .and_then(|()| translate_all(&[&objects]).map_err(|e| e.to_string()));
        Some(built)
    }
}

/// One event from either watcher (boxed: a Service is far larger than what
/// the enum otherwise needs).
enum Change {
    Service(Box<Result<Event<Service>, watcher::Error>>),
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
}

/// Watches the cluster through `client`; same outputs as the folder source.
pub fn watch(client: Client) -> (Snapshots, watch::Receiver<String>) {
    let (publisher, snap_rx, err_rx) = Publisher::new();
    tokio::spawn(async move {
        let services = watcher::watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .map(|e| Change::Service(Box::new(e)));
        let slices = watcher::watcher(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default(),
        )
        .map(|e| Change::Slice(Box::new(e)));
        let mut changes = std::pin::pin!(stream::select(services, slices));
        let mut cluster = Cluster::default();
        while let Some(change) = changes.next().await {
            let changed = match change {
                Change::Service(e) => match *e {
                    Ok(e) => cluster.services.apply(e),
                    Err(err) => watch_error(&err),
                },
                Change::Slice(e) => match *e {
                    Ok(e) => cluster.slices.apply(e),
                    Err(err) => watch_error(&err),
                },
            };
            // The watcher retries by itself (with a fresh list after 410).
            if !changed {
                continue;
            }
            if let Some(declared) = cluster.translate() {
                publisher.publish(declared, "kubernetes");
            }
        }
    });
    (snap_rx, err_rx)
}

/// The watcher retries by itself (with a fresh list after 410 Gone).
fn watch_error(err: &watcher::Error) -> bool {
    tracing::warn!(%err, "watching the cluster; retrying");
    false
}

#[cfg(test)]
mod tests;
