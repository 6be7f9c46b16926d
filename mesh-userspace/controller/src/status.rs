//! Writes the verdict on each policy and route back to its status, from the
//! leader only (see [`super::leader`]): `Accepted` and `ResolvedRefs`
//! conditions on our CRDs, by server-side apply; on an HTTPRoute, one
//! `status.parents` entry per Service parent under our controller name,
//! keeping other controllers' entries. A status is written when it differs from what this replica last
//! wrote; a new leader writes everything once.

use std::{collections::HashMap, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, chrono::Utc};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::kube_source::{KINDS, api_resource};
use lacewing_core::api::conditions::Condition;
use lacewing_core::model::k8s::policies::{ObjectRef, Verdict};

/// Our name in Gateway API status (`status.parents[].controllerName`).
pub const CONTROLLER_NAME: &str = "lacewing.io/controller";

/// How soon a failed write is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Runs until the task is dropped.
pub async fn write(
    client: Client,
    mut verdicts: watch::Receiver<Vec<Verdict>>,
    mut leader: watch::Receiver<bool>,
) {
    let mut written: HashMap<ObjectRef, Vec<Condition>> = HashMap::new();
    loop {
        let mut failed = false;
        if *leader.borrow_and_update() {
            let current = verdicts.borrow_and_update().clone();
            written.retain(|o, _| current.iter().any(|v| &v.object == o));
            for verdict in current {
                if written.get(&verdict.object) == Some(&verdict.conditions) {
                    continue;
                }
                match patch(&client, &verdict).await {
                    Ok(()) => {
                        written.insert(verdict.object, verdict.conditions);
                    }
                    Err(err) => {
                        tracing::warn!(object = %verdict.object, %err, "writing status");
                        failed = true;
                    }
                }
            }
        } else {
            // Another replica writes meanwhile: rewrite all on taking over.
            written.clear();
        }
        tokio::select! {
            r = verdicts.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}

/// Our field manager in server-side apply.
pub const FIELD_MANAGER: &str = "lacewing-controller";

fn api_for(client: &Client, object: &ObjectRef) -> Option<(Api<DynamicObject>, ApiResource)> {
    let kind = KINDS.into_iter().find(|k| k.2 == object.kind)?;
    let ar = api_resource(kind);
    let api = match &object.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    Some((api, ar))
}

/// Conditions as written, stamped with the time of this write.
fn stamped(conditions: &[Condition]) -> Vec<Value> {
    let now = serde_json::to_value(Time(Utc::now())).unwrap_or_default();
    conditions
        .iter()
        .map(|c| {
            let mut v = serde_json::to_value(c).unwrap_or_default();
            v["lastTransitionTime"] = now.clone();
            v
        })
        .collect()
}

async fn patch(client: &Client, verdict: &Verdict) -> Result<(), kube::Error> {
    let Some((api, ar)) = api_for(client, &verdict.object) else {
        return Ok(());
    };
    let name = &verdict.object.name;
    let conditions = stamped(&verdict.conditions);
    let body = if verdict.object.kind == "HTTPRoute" {
        // `parents` is one list for every controller: keep theirs, and
        // write ours only if nobody changed the route since it was read.
        let current = api.get_status(name).await?;
        let mut parents: Vec<Value> = current.data["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["controllerName"] != CONTROLLER_NAME)
            .cloned()
            .collect();
        parents.extend(verdict.parents.iter().map(|s| {
            json!({
                "parentRef": {"group": "", "kind": "Service", "namespace": s.namespace, "name": s.name},
                "controllerName": CONTROLLER_NAME,
                "conditions": conditions,
            })
        }));
        json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "status": {"parents": parents},
        })
    } else {
        // Our CRDs' status is ours alone: server-side apply as its one
        // field manager (forced, so a new leader takes the fields over).
        let body = json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": {"name": name},
            "status": {"conditions": conditions},
        });
        return api
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(drop);
    };
    // `status.parents` of a route is one atomic list shared with gateways'
    // controllers: a merge patch guarded by the resourceVersion just read.
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests;
