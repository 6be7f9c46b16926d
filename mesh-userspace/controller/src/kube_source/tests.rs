//! The Kubernetes source against a `tower_test` mock API server that serves
//! realistic list and watch JSON: adds, modifications, deletions, a bookmark,
//! and a `410 Gone` that forces a re-list. No cluster is contacted.

use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use http::{Request, Response};
use kube::client::Body;
use serde_json::json;
use tower_test::mock;

use std::sync::Arc;

use super::*;
use crate::snapshot::Snapshot;

fn service(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1", "uid": format!("uid-{name}")},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}], "type": "ClusterIP"}
    })
}

fn slice(service: &str, addresses: &[&str]) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": "shop", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>()
    })
}

fn list(kind: &str, api_version: &str, rv: &str, items: Vec<serde_json::Value>) -> Response<Body> {
    let body = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv}, "items": items});
    Response::new(Body::from(serde_json::to_vec(&body).unwrap()))
}

/// A watch response: newline-separated events, then the stream ends (the
/// watcher then watches again from the last resourceVersion).
fn events(lines: &[serde_json::Value]) -> Response<Body> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    Response::new(Body::from(text.into_bytes()))
}

fn event(kind: &str, mut object: serde_json::Value, rv: &str) -> serde_json::Value {
    object["metadata"]["resourceVersion"] = json!(rv);
    json!({"type": kind, "object": object})
}

fn bookmark(kind: &str, api_version: &str, rv: &str) -> serde_json::Value {
    json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}}})
}

fn not_found() -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
    let mut resp = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
    *resp.status_mut() = http::StatusCode::NOT_FOUND;
    resp
}

fn gone() -> serde_json::Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 1 (5)", "reason": "Expired", "code": 410}})
}

/// Serves scripted responses per kind (by plural), in order; a kind with no
/// script gets an empty list. Once a kind's script is used up its requests
/// are held open (an idle watch). Each Service response after the first
/// waits for a permit from the test, so the test sees every state. Records
/// the URI of every request.
async fn serve(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    mut scripts: BTreeMap<&'static str, VecDeque<Response<Body>>>,
    seen: tokio::sync::mpsc::UnboundedSender<String>,
    mut permits: tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let mut held = Vec::new();
    let mut gated = VecDeque::new();
    let mut first_service = true;
    loop {
        let (req, send) = tokio::select! {
            next = handle.next_request() => match next {
                Some(next) => next,
                None => return,
            },
            Some(()) = permits.recv(), if !gated.is_empty() => {
                let (send, resp): (mock::SendResponse<Response<Body>>, Response<Body>) =
                    gated.pop_front().expect("not empty");
                send.send_response(resp);
                continue;
            }
        };
        let uri = req.uri().to_string();
        let _ = seen.send(uri.clone());
        let (_, _, kind, plural) = *KINDS
            .iter()
            .find(|k| uri.contains(&format!("/{}?", k.3)))
            .unwrap_or_else(|| panic!("unexpected request {uri}"));
        let script = scripts
            .entry(plural)
            .or_insert_with(|| VecDeque::from([list(&format!("{kind}List"), "v1", "1", vec![])]));
        match script.pop_front() {
            // Answered later, when the test says so.
            Some(resp) if plural == "services" && !std::mem::replace(&mut first_service, false) => {
                gated.push_back((send, resp));
            }
            Some(resp) => send.send_response(resp),
            None => held.push(send),
        }
    }
}

/// Waits until a snapshot satisfies `want`.
async fn until(rx: &mut Snapshots, what: &str, want: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = rx.borrow_and_update().clone()
            && want(&s)
        {
            return s;
        }
        tokio::time::timeout_at(deadline, rx.changed())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for: {what}; last: {:?}",
                    rx.borrow()
                        .as_ref()
                        .map(|s| s.services.keys().collect::<Vec<_>>())
                )
            })
            .unwrap();
    }
}

fn backends(s: &Snapshot, ip: &str) -> Vec<String> {
    s.services
        .values()
        .find(|e| e.frontend.ip().to_string() == ip)
        .map(|e| e.backends.iter().map(|b| b.addr.to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn adds_modifications_deletions_bookmarks_and_relists_reach_the_model() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let services = VecDeque::from([
        list(
            "ServiceList",
            "v1",
            "10",
            vec![service("web", "10.96.0.10")],
        ),
        // watch 1: a new Service, then a bookmark
        events(&[
            event("ADDED", service("api", "10.96.0.11"), "12"),
            bookmark("Service", "v1", "20"),
        ]),
        // watch 2 (from the bookmark): the Service is deleted
        events(&[event("DELETED", service("api", "10.96.0.11"), "21")]),
        // watch 3: 410 Gone: the watcher lists again
        events(&[gone()]),
        list(
            "ServiceList",
            "v1",
            "40",
            vec![service("web", "10.96.0.10"), service("late", "10.96.0.12")],
        ),
    ]);
    let slices = VecDeque::from([
        list(
            "EndpointSliceList",
            "discovery.k8s.io/v1",
            "10",
            vec![slice("web", &["10.244.0.10"])],
        ),
        // watch 1: the endpoint moves
        events(&[event("MODIFIED", slice("web", &["10.244.0.11"]), "11")]),
    ]);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let (permit, permits) = tokio::sync::mpsc::unbounded_channel();
    let scripts = BTreeMap::from([("services", services), ("endpointslices", slices)]);
    tokio::spawn(serve(handle, scripts, seen_tx, permits));
    let (mut snapshots, _errors, _verdicts) = watch(client);

    // Initial lists, then the modification: the endpoint moved.
    until(&mut snapshots, "web's endpoint moved", |s| {
        backends(s, "10.96.0.10") == ["10.244.0.11:8080"]
    })
    .await;
    // The added Service appears, then its deletion removes it.
    permit.send(()).unwrap();
    until(&mut snapshots, "api added", |s| {
        s.services
            .keys()
            .any(|(a, _)| a.ip().to_string() == "10.96.0.11")
    })
    .await;
    permit.send(()).unwrap();
    until(&mut snapshots, "api deleted", |s| {
        !s.services
            .keys()
            .any(|(a, _)| a.ip().to_string() == "10.96.0.11")
    })
    .await;
    // 410 Gone, then the re-list brings a Service created meanwhile.
    permit.send(()).unwrap();
    permit.send(()).unwrap();
    until(&mut snapshots, "api deleted and late re-listed", |s| {
        !s.services
            .keys()
            .any(|(a, _)| a.ip().to_string() == "10.96.0.11")
            && s.services
                .keys()
                .any(|(a, _)| a.ip().to_string() == "10.96.0.12")
    })
    .await;

    let mut uris = Vec::new();
    while let Ok(u) = seen.try_recv() {
        uris.push(u);
    }
    let service_reqs: Vec<&String> = uris
        .iter()
        .filter(|u| u.starts_with("/api/v1/services"))
        .collect();
    assert!(
        service_reqs
            .iter()
            .any(|u| u.contains("watch=true") && u.contains("resourceVersion=20")),
        "the watch after the bookmark must resume from its resourceVersion: {service_reqs:?}"
    );
    let lists = service_reqs
        .iter()
        .filter(|u| !u.contains("watch=true"))
        .count();
    assert_eq!(
        lists, 2,
        "410 Gone must cause exactly one re-list: {service_reqs:?}"
    );
}

#[tokio::test]
async fn pods_namespaces_service_accounts_and_policies_reach_the_model() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let pod = |name: &str, node: &str, ip: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "resourceVersion": "3", "labels": {"app": "web"}},
            "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        })
    };
    let one = |kind: &str, api: &str, item: serde_json::Value| {
        VecDeque::from([list(&format!("{kind}List"), api, "5", vec![item])])
    };
    let scripts = BTreeMap::from([
        (
            "services",
            one("Service", "v1", service("web", "10.96.0.10")),
        ),
        (
            "endpointslices",
            one(
                "EndpointSlice",
                "discovery.k8s.io/v1",
                slice("web", &["10.244.1.10"]),
            ),
        ),
        (
            "namespaces",
            one(
                "Namespace",
                "v1",
                json!({"metadata": {"name": "shop", "labels": {"lacewing.io/mesh": "enabled"}}}),
            ),
        ),
        (
            "serviceaccounts",
            one(
                "ServiceAccount",
                "v1",
                json!({"metadata": {"name": "web", "namespace": "shop"}}),
            ),
        ),
        (
            "pods",
            VecDeque::from([
                list(
                    "PodList",
                    "v1",
                    "5",
                    vec![pod("web-1", "n1", "10.244.1.10")],
                ),
                events(&[event("ADDED", pod("web-2", "n0", "10.244.0.10"), "6")]),
            ]),
        ),
        (
            "authorizationpolicies",
            one(
                "AuthorizationPolicy",
                "lacewing.io/v1alpha1",
                json!({
                    "metadata": {"name": "bad", "namespace": "shop", "generation": 2},
                    "spec": {"action": "Deny", "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/shop"]}]}]}
                }),
            ),
        ),
        (
            "httproutes",
            one(
                "HTTPRoute",
                "gateway.networking.k8s.io/v1",
                json!({
                    "metadata": {"name": "r", "namespace": "shop", "generation": 1},
                    "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": [{"backendRefs": [{"name": "gone", "port": 80}]}]}
                }),
            ),
        ),
        // TrafficPolicy's CRD is not installed: 404, as the API server says.
        ("trafficpolicies", VecDeque::from([not_found()])),
    ]);
    let (seen_tx, _seen) = tokio::sync::mpsc::unbounded_channel();
    let (_permit, permits) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(serve(handle, scripts, seen_tx, permits));
    let (mut snapshots, _errors, verdicts) = watch(client);

    // Both pods, each in its node's slice, meshed by their namespace's label;
    // the Service is published although two policies are rejected and one
    // kind is not served at all.
    let s = until(&mut snapshots, "both pods", |s| s.workloads.len() == 2).await;
    let w = &s.workloads["n1"]["shop/web-1"];
    assert!(
        w.meshed
            && w.service_account == "web"
            && w.identity("cluster.local") == "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        s.workloads["n0"]["shop/web-2"].addresses,
        ["10.244.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(backends(&s, "10.96.0.10"), ["10.244.1.10:8080"]);

    let verdicts = verdicts.borrow().clone();
    let reasons: Vec<(String, Option<String>)> = verdicts
        .iter()
        .map(|v| (v.object.to_string(), v.rejection()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    let why = |name: &str| {
        reasons
            .iter()
            .find(|r| r.0 == name)
            .and_then(|r| r.1.clone())
            .unwrap_or_default()
    };
    assert!(
        why("AuthorizationPolicy shop/bad").contains("Accepted: False, reason InvalidPrincipal"),
        "{reasons:?}"
    );
    assert!(why("HTTPRoute shop/r").contains("names Service shop/gone, which does not exist (ResolvedRefs: False, reason BackendNotFound)"), "{reasons:?}");
    let route = verdicts
        .iter()
        .find(|v| v.object.kind == "HTTPRoute")
        .unwrap();
    assert_eq!(
        route.parents.len(),
        1,
        "one status entry for the Service parent"
    );
    assert_eq!(route.conditions[0].observed_generation, Some(1));
}
