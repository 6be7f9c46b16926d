//! The Kubernetes source: a typed kube-rs watcher on every kind the model
//! reads (`k8s-openapi` objects and our CRD types; re-listing after `410
//! Gone`, following bookmarks, as the watcher does), kept in stores of
//! objects already read into the model's terms, and fed to the same
//! translation as the folder source.
//!
//! Unlike the folder source, one bad object does not hold back the rest of
//! the cluster: a rejected policy or route is left out (and its status says
//! why, see [`super::status`]); an object the API server should never have
//! accepted is skipped with a warning.

use std::collections::BTreeMap;

use futures::{StreamExt as _, stream, stream::BoxStream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Resource,
    api::ApiResource,
    runtime::watcher::{self, Event},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::snapshot::{Publisher, Snapshots};
use lacewing_core::model::k8s::{
    K8sError, Objects, Translation, Typed, policies::Verdict, translate_all,
};

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
/// model's terms once, from the typed object its event carries (a
/// translation then only gathers them; nothing is parsed again). An
/// object's `resourceVersion` tells an unchanged re-list item from a
/// changed one.
#[derive(Debug)]
pub struct KindStore {
    kind: &'static str,
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

/// A watcher event of any kind, its object typed.
pub type TypedEvent = Event<(ObjectMeta, Typed)>;

impl KindStore {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind: kind.2,
            objects: BTreeMap::new(),
            relist: None,
            ready: false,
        }
    }

    /// Reads one object into the model's terms; `None` (with a warning)
    /// for an object the API server should never have accepted.
    fn read(&self, meta: &ObjectMeta, object: Typed) -> Option<Stored> {
        let origin = format!(
            "{} {}/{}",
            self.kind,
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        );
        let mut read = Objects::default();
        match read.add_typed(&origin, object) {
            Ok(()) => Some(Stored {
                version: meta.resource_version.clone(),
                read,
            }),
            Err(err) => {
                tracing::warn!(%err, "skipping an object the model cannot read");
                None
            }
        }
    }

    /// Applies one watcher event; whether the store's contents changed.
    pub fn apply(&mut self, event: TypedEvent) -> bool {
        let key = |m: &ObjectMeta| {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply((meta, o)) => {
                if let Some(stored) = self.read(&meta, o) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&meta), stored);
                }
                false
            }
            Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                self.ready = true;
                true
            }
            Event::Apply((meta, o)) => {
                let k = key(&meta);
                let version = &meta.resource_version;
                if version.is_some() && self.objects.get(&k).is_some_and(|s| &s.version == version)
                {
                    return false;
                }
                match self.read(&meta, o) {
                    Some(stored) => {
                        self.objects.insert(k, stored);
                        true
                    }
                    None => self.objects.remove(&k).is_some(),
                }
            }
            Event::Delete((meta, _)) => self.objects.remove(&key(&meta)).is_some(),
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

/// The watcher of one kind, typed as `K`, its events carrying the model's
/// [`Typed`] (made by `wrap`) and tagged with the kind's index in [`KINDS`].
fn watch_kind<K>(
    client: &Client,
    index: usize,
    wrap: fn(K) -> Typed,
) -> BoxStream<'static, (usize, Result<TypedEvent, watcher::Error>)>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    debug_assert_eq!(
        K::kind(&()),
        KINDS[index].2,
        "KINDS and the watchers disagree"
    );
    let typed = move |o: K| (o.meta().clone(), wrap(o));
    watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .map(move |event| {
            let event = event.map(|e| match e {
                Event::Init => Event::Init,
                Event::InitApply(o) => Event::InitApply(typed(o)),
                Event::InitDone => Event::InitDone,
                Event::Apply(o) => Event::Apply(typed(o)),
                Event::Delete(o) => Event::Delete(typed(o)),
            });
            (index, event)
        })
        .boxed()
}

/// One typed watcher per kind of [`KINDS`], in its order.
fn watchers(
    client: &Client,
) -> Vec<BoxStream<'static, (usize, Result<TypedEvent, watcher::Error>)>> {
    use lacewing_core::model::k8s::policies::Policy;
    vec![
        watch_kind(client, 0, Typed::Service),
        watch_kind(client, 1, Typed::Node),
        watch_kind(client, 2, Typed::EndpointSlice),
        watch_kind(client, 3, Typed::Pod),
        watch_kind(client, 4, Typed::Namespace),
        watch_kind(client, 5, Typed::ServiceAccount),
        watch_kind(client, 6, |p| Typed::Policy(Policy::Authorization(p))),
        watch_kind(client, 7, |p| Typed::Policy(Policy::Traffic(p))),
        watch_kind(client, 8, |p| Typed::Policy(Policy::Mesh(p))),
        watch_kind(client, 9, |p| Typed::Policy(Policy::Route(p))),
    ]
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
    pub fn translate(&self) -> Option<Result<Translation, K8sError>> {
        if !self.stores.iter().all(|s| s.ready) {
            return None;
        }
        let parts: Vec<&Objects> = self.stores.iter().flat_map(KindStore::parts).collect();
        Some(translate_all(&parts))
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
        let mut changes = stream::select_all(watchers(&client));
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
                Some(Err(err)) => publisher.publish(Err(err.into()), "kubernetes"),
            }
        }
    });
    (snap_rx, err_rx, verdicts_rx)
}

#[cfg(test)]
mod tests;
