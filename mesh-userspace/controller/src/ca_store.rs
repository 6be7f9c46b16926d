//! The CA in Kubernetes: kept in a Secret (`lacewing-ca` in the controller's
//! namespace, keys `ca.pem` and `ca-key.pem`, and optionally
//! `trust-bundle.pem`: every root trusted, for a rotation), created by the
//! first replica that finds none; a replica that loses that race (409)
//! reads the winner's. An operator who brings their own CA creates the
//! Secret before installing. Read when a controller starts.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};

use lacewing_core::{pki::Ca, trust::Authority};

pub const SECRET_NAME: &str = "lacewing-ca";
const CERT_KEY: &str = "ca.pem";
const KEY_KEY: &str = "ca-key.pem";
const BUNDLE_KEY: &str = lacewing_core::trust::BUNDLE_FILE;

#[derive(Debug, thiserror::Error)]
pub enum CaStoreError {
    #[error("Secret {namespace}/{SECRET_NAME}: {source}")]
    Api {
        namespace: String,
        source: Box<kube::Error>,
    },
    #[error("Secret {namespace}/{SECRET_NAME}, key {key}: {detail}")]
    Bad {
        namespace: String,
        key: &'static str,
        detail: String,
    },
}

/// The ConfigMap nodes read the mesh's root certificate from (public; the
/// key stays in the Secret), as Istio publishes `istio-ca-root-cert`.
pub const ROOT_CONFIGMAP: &str = "lacewing-ca-root";

/// Publishes the trust bundle in [`ROOT_CONFIGMAP`] (server-side apply:
/// every replica may, and the result is the same).
pub async fn publish_root(
    client: Client,
    namespace: &str,
    authority: &Authority,
) -> Result<(), CaStoreError> {
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace},
        "data": {CERT_KEY: authority.bundle_pem},
    });
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, namespace)
        .patch(
            ROOT_CONFIGMAP,
            &kube::api::PatchParams::apply("lacewing-controller").force(),
            &kube::api::Patch::Apply(&cm),
        )
        .await
        .map(drop)
        .map_err(|source| CaStoreError::Api {
            namespace: namespace.to_owned(),
            source: Box::new(source),
        })
}

/// The CA and trust bundle from the Secret, created if there is none.
pub async fn load_or_create(client: Client, namespace: &str) -> Result<Authority, CaStoreError> {
    let api = Api::<Secret>::namespaced(client, namespace);
    let api_err = |source| CaStoreError::Api {
        namespace: namespace.to_owned(),
        source: Box::new(source),
    };
    if let Some(secret) = api.get_opt(SECRET_NAME).await.map_err(api_err)? {
        return from_secret(&secret, namespace);
    }
    let (ca, key_pem) = Ca::generate().map_err(|e| CaStoreError::Bad {
        namespace: namespace.to_owned(),
        key: KEY_KEY,
        detail: e.to_string(),
    })?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (
                CERT_KEY.to_owned(),
                ByteString(ca.pem().as_bytes().to_vec()),
            ),
            (KEY_KEY.to_owned(), ByteString(key_pem.into_bytes())),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(%namespace, secret = SECRET_NAME, "created the mesh CA");
            let bundle = ca.pem().to_owned();
            authority(ca, bundle, namespace)
        }
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = api.get(SECRET_NAME).await.map_err(api_err)?;
            from_secret(&secret, namespace)
        }
        Err(e) => Err(api_err(e)),
    }
}

fn from_secret(secret: &Secret, namespace: &str) -> Result<Authority, CaStoreError> {
    let optional = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let field = |key: &'static str| {
        optional(key).ok_or_else(|| CaStoreError::Bad {
            namespace: namespace.to_owned(),
            key,
            detail: "missing".to_owned(),
        })
    };
    let cert = field(CERT_KEY)?;
    let ca = Ca::from_pem(&cert, &field(KEY_KEY)?).map_err(|e| CaStoreError::Bad {
        namespace: namespace.to_owned(),
        key: KEY_KEY,
        detail: e.to_string(),
    })?;
    authority(ca, optional(BUNDLE_KEY).unwrap_or(cert), namespace)
}

/// `ca` with `bundle`, which must hold it.
fn authority(ca: Ca, bundle: String, namespace: &str) -> Result<Authority, CaStoreError> {
    Authority::new(ca, bundle, std::path::Path::new(BUNDLE_KEY)).map_err(|e| CaStoreError::Bad {
        namespace: namespace.to_owned(),
        key: BUNDLE_KEY,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    const PATH: &str = "/api/v1/namespaces/lacewing-system/secrets";

    fn reply(code: StatusCode, body: &Value) -> Response<Body> {
        let mut resp = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
        *resp.status_mut() = code;
        resp
    }

    fn status(code: StatusCode, reason: &str) -> Response<Body> {
        reply(
            code,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": reason, "reason": reason, "code": code.as_u16()}),
        )
    }

    /// A mock API server holding at most one Secret; with `race`, a create
    /// answers 409 after another replica's Secret appears.
    async fn serve(
        mut handle: mock::Handle<Request<Body>, Response<Body>>,
        stored: Arc<Mutex<Option<Value>>>,
        race: Option<Value>,
    ) {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let body: Value =
                serde_json::from_slice(&body.collect_bytes().await.unwrap()).unwrap_or(Value::Null);
            let mut s = stored.lock().unwrap();
            let resp = match (&parts.method, parts.uri.path()) {
                (&Method::GET, p) if p == format!("{PATH}/{SECRET_NAME}") => match &*s {
                    Some(secret) => reply(StatusCode::OK, secret),
                    None => status(StatusCode::NOT_FOUND, "NotFound"),
                },
                (&Method::POST, PATH) => match &race {
                    Some(theirs) => {
                        *s = Some(theirs.clone());
                        status(StatusCode::CONFLICT, "AlreadyExists")
                    }
                    None => {
                        *s = Some(body.clone());
                        reply(StatusCode::CREATED, &body)
                    }
                },
                (m, p) => panic!("unexpected {m} {p}"),
            };
            send.send_response(resp);
        }
    }

    fn secret_of(ca: &Ca, key_pem: &str) -> Value {
        secret_with_bundle(ca, key_pem, None)
    }

    fn secret_with_bundle(ca: &Ca, key_pem: &str, bundle: Option<&str>) -> Value {
        let mut data = BTreeMap::from([
            (
                CERT_KEY.to_owned(),
                ByteString(ca.pem().as_bytes().to_vec()),
            ),
            (KEY_KEY.to_owned(), ByteString(key_pem.as_bytes().to_vec())),
        ]);
        if let Some(bundle) = bundle {
            data.insert(
                BUNDLE_KEY.to_owned(),
                ByteString(bundle.as_bytes().to_vec()),
            );
        }
        let mut secret = serde_json::to_value(Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.to_owned()),
                namespace: Some("lacewing-system".to_owned()),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        })
        .unwrap();
        secret["apiVersion"] = json!("v1");
        secret["kind"] = json!("Secret");
        secret
    }

    async fn load(
        stored: Option<Value>,
        race: Option<Value>,
    ) -> (Result<Authority, CaStoreError>, Option<Value>) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let stored = Arc::new(Mutex::new(stored));
        tokio::spawn(serve(handle, Arc::clone(&stored), race));
        let authority = load_or_create(Client::new(svc, "default"), "lacewing-system").await;
        let kept = stored.lock().unwrap().clone();
        (authority, kept)
    }

    async fn run(stored: Option<Value>, race: Option<Value>) -> (Ca, Option<Value>) {
        let (authority, kept) = load(stored, race).await;
        (authority.unwrap().signer, kept)
    }

    #[tokio::test]
    async fn the_first_replica_creates_the_ca_and_the_next_ones_load_it() {
        let (created, kept) = run(None, None).await;
        let kept = kept.expect("the CA was stored in a Secret");
        let (loaded, _) = run(Some(kept), None).await;
        assert_eq!(loaded.pem(), created.pem(), "a restart keeps the CA");
    }

    #[tokio::test]
    async fn a_bundle_in_the_secret_is_the_trust_bundle_if_it_holds_the_signer() {
        let (signer, key) = Ca::generate().unwrap();
        let (next, _) = Ca::generate().unwrap();
        let both = format!("{}{}", signer.pem(), next.pem());
        let (authority, _) = load(Some(secret_with_bundle(&signer, &key, Some(&both))), None).await;
        let authority = authority.unwrap();
        assert_eq!(
            (authority.roots(), authority.bundle_pem.as_str()),
            (2, both.as_str())
        );
        // A bundle without the signer is refused, naming the key to fix.
        let (refused, _) = load(
            Some(secret_with_bundle(&signer, &key, Some(next.pem()))),
            None,
        )
        .await;
        let err = refused.err().expect("refused").to_string();
        assert!(
            err.contains("lacewing-ca, key trust-bundle.pem: the signing CA")
                && err.contains("is not in"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_root_is_published_for_nodes_without_the_key() {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (ca, key) = Ca::generate().unwrap();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::PATCH);
            assert!(
                req.uri()
                    .to_string()
                    .starts_with("/api/v1/namespaces/lacewing-system/configmaps/lacewing-ca-root?"),
                "{}",
                req.uri()
            );
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            send.send_response(reply(StatusCode::OK, &body));
            body
        });
        let bundle = ca.pem().to_owned();
        let authority = Authority::new(ca, bundle, std::path::Path::new("-")).unwrap();
        publish_root(Client::new(svc, "default"), "lacewing-system", &authority)
            .await
            .unwrap();
        let ca = &authority.signer;
        let body = server.await.unwrap();
        assert_eq!(body["data"]["ca.pem"], ca.pem());
        assert!(
            !body.to_string().contains(key.trim()),
            "the key is never published"
        );
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_race_uses_the_winners_ca() {
        let (winner, key) = Ca::generate().unwrap();
        let (ca, _) = run(None, Some(secret_of(&winner, &key))).await;
        assert_eq!(ca.pem(), winner.pem());
        // And it signs leaves that chain to the winner's certificate.
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let (_, csr) = lacewing_core::pki::new_key_and_csr(id).unwrap();
        let leaf = ca
            .sign_csr(&csr, id, std::time::Duration::from_secs(60))
            .unwrap();
        let roots = lacewing_tunnel::tls::roots(winner.pem()).unwrap();
        let der =
            rustls::pki_types::CertificateDer::from(lacewing_core::pki::pem_to_der(&leaf).unwrap());
        let parsed = rustls::server::ParsedCertificate::try_from(&der).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            lacewing_tunnel::tls::provider()
                .signature_verification_algorithms
                .all,
        )
        .expect("the leaf chains to the winner's CA");
    }
}
