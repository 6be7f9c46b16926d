//! Two controller replicas against one mock API server (`tower_test`) that
//! keeps a Lease with resourceVersion checks as the API server does: one
//! replica leads at a time, only the leader writes status, and when it stops
//! the other takes over and writes.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use super::*;
use crate::leader::{LeaseConfig, elect};
use lacewing_core::api::conditions::{ACCEPTED, RESOLVED_REFS};
use lacewing_core::model::k8s::policies::ServiceName;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/lacewing-system/leases";
const AUTHZ: &str = "/apis/lacewing.io/v1alpha1/namespaces/shop/authorizationpolicies/bad/status";
const ROUTE: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/r/status";

#[derive(Default)]
struct ApiState {
    lease: Option<Value>,
    version: u64,
    /// (replica, path, body) of every status write.
    writes: Vec<(String, String, Value)>,
}

fn reply(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
    *resp.status_mut() = code;
    resp
}

fn failure(code: StatusCode, reason: &str) -> Response<Body> {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": reason, "reason": reason, "code": code.as_u16()}),
    )
}

/// One replica's connection to the shared API state.
async fn serve(
    replica: &'static str,
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    state: Arc<Mutex<ApiState>>,
) {
    while let Some((req, send)) = handle.next_request().await {
        let (parts, body) = req.into_parts();
        let body = body.collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = parts.uri.path().to_owned();
        let mut s = state.lock().unwrap();
        let resp = match (&parts.method, path.as_str()) {
            (&Method::GET, p) if p == format!("{LEASE}/lacewing-controller") => match &s.lease {
                Some(l) => reply(StatusCode::OK, l),
                None => failure(StatusCode::NOT_FOUND, "NotFound"),
            },
            (&Method::POST, LEASE) if s.lease.is_some() => {
                failure(StatusCode::CONFLICT, "AlreadyExists")
            }
            (&Method::POST, LEASE) | (&Method::PUT, _) if path.starts_with(LEASE) => {
                let current = s
                    .lease
                    .as_ref()
                    .map(|l| l["metadata"]["resourceVersion"].clone());
                if parts.method == Method::PUT
                    && current != Some(body["metadata"]["resourceVersion"].clone())
                {
                    failure(StatusCode::CONFLICT, "Conflict")
                } else {
                    s.version += 1;
                    let mut lease = body;
                    lease["metadata"]["resourceVersion"] = json!(s.version.to_string());
                    s.lease = Some(lease.clone());
                    reply(StatusCode::OK, &lease)
                }
            }
            (&Method::GET, ROUTE) => reply(
                StatusCode::OK,
                &json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                        "metadata": {"name": "r", "namespace": "shop", "resourceVersion": "7"},
                        "status": {"parents": [{"controllerName": "example.com/gateway", "parentRef": {"name": "gw"}, "conditions": []}]}}),
            ),
            (&Method::PATCH, p @ (AUTHZ | ROUTE)) => {
                // How it was written, beside what.
                let mut body = body;
                body["__request"] = json!({
                    "contentType": parts.headers.get("content-type").and_then(|v| v.to_str().ok()),
                    "query": parts.uri.query(),
                });
                s.writes
                    .push((replica.to_owned(), p.to_owned(), body.clone()));
                reply(StatusCode::OK, &json!({"metadata": {"name": "x"}}))
            }
            (m, p) => panic!("unexpected {m} {p}"),
        };
        send.send_response(resp);
    }
}

fn verdicts() -> Vec<Verdict> {
    let condition = |type_: &str, status: &str, reason: &str| Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: format!("{type_} {reason}"),
        observed_generation: Some(2),
        last_transition_time: None,
    };
    vec![
        Verdict {
            object: ObjectRef {
                kind: "AuthorizationPolicy".into(),
                namespace: Some("shop".into()),
                name: "bad".into(),
            },
            origin: "AuthorizationPolicy shop/bad".into(),
            generation: Some(2),
            conditions: vec![
                condition(ACCEPTED, "False", "InvalidPrincipal"),
                condition(RESOLVED_REFS, "True", "ResolvedRefs"),
            ],
            parents: vec![],
        },
        Verdict {
            object: ObjectRef {
                kind: "HTTPRoute".into(),
                namespace: Some("shop".into()),
                name: "r".into(),
            },
            origin: "HTTPRoute shop/r".into(),
            generation: Some(1),
            conditions: vec![
                condition(ACCEPTED, "True", "Accepted"),
                condition(RESOLVED_REFS, "False", "BackendNotFound"),
            ],
            parents: vec![ServiceName {
                namespace: "shop".into(),
                name: "web".into(),
            }],
        },
    ]
}

struct Replica {
    leader: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn replica(
    name: &'static str,
    state: &Arc<Mutex<ApiState>>,
    verdicts: &watch::Receiver<Vec<Verdict>>,
) -> Replica {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let server = tokio::spawn(serve(name, handle, Arc::clone(state)));
    let config = LeaseConfig {
        duration: Duration::from_millis(600),
        retry: Duration::from_millis(50),
        ..LeaseConfig::new("lacewing-system".into(), name.into())
    };
    let (leader, election) = elect(client.clone(), config);
    let writer = tokio::spawn(write(client, verdicts.clone(), leader.clone()));
    Replica {
        leader,
        tasks: vec![server, election, writer],
    }
}

fn writes_by(state: &Mutex<ApiState>, replica: &str) -> Vec<(String, Value)> {
    state
        .lock()
        .unwrap()
        .writes
        .iter()
        .filter(|w| w.0 == replica)
        .map(|w| (w.1.clone(), w.2.clone()))
        .collect()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn one_leader_writes_status_and_another_takes_over_when_it_stops() {
    let state = Arc::new(Mutex::new(ApiState::default()));
    let (_verdicts_tx, verdicts_rx) = watch::channel(verdicts());
    let a = replica("controller-a", &state, &verdicts_rx);
    let b = replica("controller-b", &state, &verdicts_rx);

    wait_for("a leader", || *a.leader.borrow() || *b.leader.borrow()).await;
    // Never two at once, over many renewals.
    for _ in 0..25 {
        assert!(!(*a.leader.borrow() && *b.leader.borrow()), "two leaders");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first, second, first_name, second_name) = if *a.leader.borrow() {
        (a, b, "controller-a", "controller-b")
    } else {
        (b, a, "controller-b", "controller-a")
    };
    wait_for("the leader's two status writes", || {
        writes_by(&state, first_name).len() == 2
    })
    .await;
    assert!(
        writes_by(&state, second_name).is_empty(),
        "only the leader writes status"
    );

    let writes = writes_by(&state, first_name);
    let authz = &writes
        .iter()
        .find(|w| w.0 == AUTHZ)
        .expect("authz status")
        .1;
    // Server-side apply, as the controller's own field manager.
    assert_eq!(
        authz["__request"]["contentType"],
        "application/apply-patch+yaml"
    );
    let query = authz["__request"]["query"].as_str().unwrap_or_default();
    assert!(
        query.contains("fieldManager=lacewing-controller") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(authz["apiVersion"], "lacewing.io/v1alpha1");
    assert_eq!(authz["kind"], "AuthorizationPolicy");
    let conditions = authz["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions[0]["type"], "Accepted");
    assert_eq!(conditions[0]["status"], "False");
    assert_eq!(conditions[0]["reason"], "InvalidPrincipal");
    assert_eq!(conditions[0]["observedGeneration"], 2);
    assert!(
        conditions[0]["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let route = &writes
        .iter()
        .find(|w| w.0 == ROUTE)
        .expect("route status")
        .1;
    assert_eq!(
        route["metadata"]["resourceVersion"], "7",
        "written only over what was read"
    );
    let parents = route["status"]["parents"].as_array().unwrap();
    assert_eq!(
        parents.len(),
        2,
        "another controller's entry is kept: {parents:?}"
    );
    assert_eq!(parents[0]["controllerName"], "example.com/gateway");
    assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(parents[1]["parentRef"]["kind"], "Service");
    assert_eq!(parents[1]["conditions"][1]["reason"], "BackendNotFound");

    // Nothing changes: nothing more is written.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(writes_by(&state, first_name).len(), 2);

    // The leader stops (its renewals end); the other takes over after the
    // lease duration and writes every status once.
    for task in &first.tasks {
        task.abort();
    }
    wait_for("the takeover", || *second.leader.borrow()).await;
    wait_for("the new leader's writes", || {
        writes_by(&state, second_name).len() == 2
    })
    .await;
    let lease = state.lock().unwrap().lease.clone().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], second_name);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}
