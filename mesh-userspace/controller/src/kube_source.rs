//! The Kubernetes source: kube-rs watchers on every kind the model reads
//! (re-listing after `410 Gone`, following bookmarks, as the watcher does),
//! kept in stores of objects already read into the model's terms, and fed
//! to the same translation as the folder source.
//!
//! Unlike the folder source, one bad object does not hold back the rest of
//! the cluster: a rejected policy or route is left out (and its status says
//! why, see [`super::status`]); an object the API server should never have
//! accepted is skipped with a warning.

use std::collections::BTreeMap;

use futures::{StreamExt as _, stream};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    core::TypeMeta,
    runtime::watcher::{self, Event},
};
use tokio::sync::watch;

use super::snapshot::{Publisher, Snapshots};
use lacewing_core::model::k8s::{Objects, Translation, policies::Verdict, translate_all};

/// A kind the controller watches: (group, version, kind, plural).
pub type Kind = (&'static str, &'static str, &'static str, &'static str);

/// Everything the model reads, cluster-wide.
pub const KINDS: [Kind; 10] = [
    ("", "v1", "Service", "services"),
    ("", "v1", "Node", "nodes"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Namespace", "namespaces"),
    ("", "v1", "ServiceAccount", "serviceaccounts"),
    (
        "lacewing.io",
        "v1alpha1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "lacewing.io",
        "v1alpha1",
        "TrafficPolicy",
        "trafficpolicies",
    ),
    ("lacewing.io", "v1alpha1", "MeshConfig", "meshconfigs"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
];

pub fn api_resource((group, version, kind, plural): Kind) -> ApiResource {
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// The objects of one kind, by namespace and name, each read into the
/// model's terms once, when its event arrives (a translation then only
/// gathers them; nothing is parsed again). An object's `resourceVersion`
/// tells an unchanged re-list item from a changed one.
#[derive(Debug)]
pub struct KindStore {
    types: TypeMeta,
    objects: BTreeMap<(String, String), Stored>,
    /// Objects of a re-list in progress; swapped in at its end, so a re-list
    /// never shows a half-empty cluster.
    relist: Option<BTreeMap<(String, String), Stored>>,
    /// Whether a first full list has completed.
    pub ready: bool,
}

/// One object as the model read it, and the version it was read at.
#[derive(Debug)]
struct Stored {
    version: Option<String>,
    read: Objects,
}

impl KindStore {
    pub fn new(kind: Kind) -> Self {
        let ar = api_resource(kind);
        Self {
            types: TypeMeta {
                api_version: ar.api_version,
                kind: ar.kind,
            },
            objects: BTreeMap::new(),
            relist: None,
            ready: false,
        }
    }

    /// Reads one object into the model's terms; `None` (with a warning)
    /// for an object the API server should never have accepted.
    fn read(&self, mut o: DynamicObject) -> Option<Stored> {
        let version = o.resource_version();
        let origin = format!(
            "{} {}/{}",
            self.types.kind,
            o.namespace().unwrap_or_default(),
            o.name_any()
        );
        // List items come without their kind; the model needs it.
        o.types = Some(self.types.clone());
        let mut read = Objects::default();
        let json = serde_json::to_string(&o).ok()?;
        match read.add_yaml(&origin, &json) {
            Ok(()) => Some(Stored { version, read }),
            Err(err) => {
                tracing::warn!(%err, "skipping an object the model cannot read");
                None
            }
        }
    }

    /// Applies one watcher event; whether the store's contents changed.
    pub fn apply(&mut self, event: Event<DynamicObject>) -> bool {
        let key = |o: &DynamicObject| (o.namespace().unwrap_or_default(), o.name_any());
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                let k = key(&o);
                if let Some(stored) = self.read(o) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(k, stored);
                }
                false
            }
            Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.ready = true;
                true
            }
            Event::Apply(o) => {
                let k = key(&o);
                let version = o.resource_version();
                if version.is_some() && self.objects.get(&k).is_some_and(|s| s.version == version) {
                    return false;
                }
                match self.read(o) {
                    Some(stored) => {
                        self.objects.insert(k, stored);
                        true
                    }
                    None => self.objects.remove(&k).is_some(),
                }
            }
            Event::Delete(o) => self.objects.remove(&key(&o)).is_some(),
        }
    }

    /// The API server does not serve this kind: it has no objects. Whether
    /// that changes the store.
    pub fn absent(&mut self) -> bool {
        let changed = !self.ready || !self.objects.is_empty();
        self.objects.clear();
        self.ready = true;
        changed
    }

    fn parts(&self) -> impl Iterator<Item = &Objects> {
        self.objects.values().map(|s| &s.read)
    }
}

/// Every watched kind's store.
#[derive(Debug)]
pub struct Cluster {
    pub stores: Vec<KindStore>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            stores: KINDS.into_iter().map(KindStore::new).collect(),
        }
    }
}

impl Cluster {
    /// The model and the verdicts on policies, once every kind has been
    /// listed.
    pub fn translate(&self) -> Option<Result<Translation, String>> {
        if !self.stores.iter().all(|s| s.ready) {
            return None;
        }
        let parts: Vec<&Objects> = self.stores.iter().flat_map(KindStore::parts).collect();
        Some(translate_all(&parts).map_err(|e| e.to_string()))
    }
}

/// Watches the cluster through `client`: the folder source's outputs, plus
/// the verdicts on policies and routes for the status writer.
pub fn watch(
    client: Client,
) -> (
    Snapshots,
    watch::Receiver<String>,
    watch::Receiver<Vec<Verdict>>,
) {
    let (publisher, snap_rx, err_rx) = Publisher::new();
    let (verdicts_tx, verdicts_rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        let watchers = KINDS.iter().enumerate().map(|(index, kind)| {
            let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource(*kind));
            watcher::watcher(api, watcher::Config::default())
                .map(move |event| (index, event))
                .boxed()
        });
        let mut changes = stream::select_all(watchers);
        let mut cluster = Cluster::default();
        while let Some((index, event)) = changes.next().await {
            let changed = match event {
                Ok(event) => cluster.stores[index].apply(event),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(e))) if e.code == 404 => {
                    // The kind's CRD is not installed (Gateway API is often
                    // absent): none of it, until it appears and lists.
                    tracing::info!(
                        kind = KINDS[index].2,
                        "not served by this cluster; treating as empty"
                    );
                    cluster.stores[index].absent()
                }
                Err(err) => {
                    // The watcher retries by itself (with a fresh list after 410 Gone).
                    tracing::warn!(kind = KINDS[index].2, %err, "watching the cluster; retrying");
                    false
                }
            };
            if !changed {
                continue;
            }
            match cluster.translate() {
                None => {}
                Some(Ok(translation)) => {
                    for why in translation.verdicts.iter().filter_map(Verdict::rejection) {
                        tracing::warn!(%why, "rejected; not sent to any node");
                    }
                    verdicts_tx.send_if_modified(|v| {
                        let changed = *v != translation.verdicts;
                        *v = translation.verdicts;
                        changed
                    });
                    publisher.publish(Ok(translation.declared), "kubernetes");
                }
                Some(Err(err)) => publisher.publish(Err(err), "kubernetes"),
            }
        }
    });
    (snap_rx, err_rx, verdicts_rx)
}

#[cfg(test)]
mod tests;
