//! The `CertificateService`: signs a workload identity for the node its pod
//! runs on, and for no other. The pod must be in the latest configuration,
//! scheduled on the node the client certificate names; the identity comes
//! from the pod's namespace and service account, never from the request.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};

use super::{authority::Authorities, grpc::certified_node, snapshot::Snapshots};
use lacewing_core::pki;
use lacewing_core::proto::ca_pb::{
    BootstrapNodeRequest, CreateCertificateRequest, CreateCertificateResponse, RenewNodeRequest,
    TrustBundle, WatchTrustBundleRequest,
    certificate_service_server::{CertificateService, CertificateServiceServer},
};

pub struct Signer {
    /// The CA that signs and the bundle handed out with what it signs.
    pub authority: Authorities,
    pub trust_domain: String,
    /// Workload certificate lifetime.
    pub ttl: Duration,
    /// Node certificate lifetime (bootstrap and renewal).
    pub node_ttl: Duration,
    pub snapshots: Snapshots,
    /// How nodes prove who they are for their first certificate (in a
    /// cluster); none in folder mode, where the lab issues node certificates.
    pub bootstrap: Option<super::bootstrap::TokenReviewer>,
}

pub use lacewing_core::pki::NODE_CERT_TTL;

pub fn server(signer: Arc<Signer>) -> CertificateServiceServer<Server> {
    CertificateServiceServer::new(Server(signer))
}

pub struct Server(Arc<Signer>);

impl Signer {
    /// Signs `csr_pem` for `identity` with the CA in force now; the
    /// response carries the bundle of the same moment.
    fn sign(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: Duration,
    ) -> Result<CreateCertificateResponse, pki::PkiError> {
        let authority = Arc::clone(&self.authority.borrow());
        let cert = authority.signer.sign_csr(csr_pem, identity, ttl)?;
        Ok(CreateCertificateResponse {
            cert_chain_pem: vec![cert],
            trust_bundle_pem: authority.bundle_pem.clone(),
        })
    }
}

/// A bad request is the caller's to fix; anything else is ours.
fn status(err: pki::PkiError) -> Status {
    match err {
        pki::PkiError::BadRequest(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl CertificateService for Server {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let signer = &self.0;
        let node = certified_node(&request, &signer.trust_domain)?;
        let req = request.into_inner();
        let key = format!("{}/{}", req.namespace, req.pod);
        let workload = signer
            .snapshots
            .borrow()
            .as_ref()
            .and_then(|s| s.workloads.get(&node).and_then(|w| w.get(&key)).cloned());
        let Some(workload) = workload else {
            tracing::warn!(%node, pod = %key, "refused a certificate for a pod that is not on the asking node");
            return Err(Status::permission_denied(format!(
                "pod {key} is not scheduled on node {node}; a node may only ask for its own pods' identities"
            )));
        };
        let identity = workload.identity(&signer.trust_domain);
        let signed = signer
            .sign(&req.csr_pem, &identity, signer.ttl)
            .map_err(status)?;
        tracing::info!(%node, pod = %key, %identity, "signed a workload certificate");
        Ok(Response::new(signed))
    }

    async fn bootstrap_node(
        &self,
        request: Request<BootstrapNodeRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let signer = &self.0;
        let Some(reviewer) = &signer.bootstrap else {
            return Err(Status::unimplemented(
                "node bootstrap needs the Kubernetes source; give the node its certificate (--tls-dir)",
            ));
        };
        let req = request.into_inner();
        if let Err(why) = reviewer.review(&req.token, &req.node).await {
            tracing::warn!(node = %req.node, %why, "refused a node bootstrap");
            return Err(Status::permission_denied(why.to_string()));
        }
        let identity = pki::node_identity(&signer.trust_domain, &req.node);
        let signed = signer
            .sign(&req.csr_pem, &identity, signer.node_ttl)
            .map_err(status)?;
        tracing::info!(node = %req.node, "signed a node certificate (bootstrap)");
        Ok(Response::new(signed))
    }

    async fn renew_node(
        &self,
        request: Request<RenewNodeRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let signer = &self.0;
        // Only ever the node the (still valid) client certificate names.
        let node = certified_node(&request, &signer.trust_domain)?;
        let identity = pki::node_identity(&signer.trust_domain, &node);
        let signed = signer
            .sign(&request.into_inner().csr_pem, &identity, signer.node_ttl)
            .map_err(status)?;
        tracing::info!(%node, "renewed a node certificate");
        Ok(Response::new(signed))
    }

    type WatchTrustBundleStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<TrustBundle, Status>> + Send>>;

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        let node = certified_node(&request, &self.0.trust_domain)?;
        tracing::debug!(%node, "a node watches the trust bundle");
        use tokio_stream::StreamExt as _;
        let mut last = String::new();
        // Only changes of the bundle itself (a new signer alone is none).
        let bundles = tokio_stream::wrappers::WatchStream::new(self.0.authority.clone())
            .filter_map(move |a| {
                (a.bundle_pem != last).then(|| {
                    last.clone_from(&a.bundle_pem);
                    TrustBundle {
                        pem: a.bundle_pem.clone(),
                    }
                })
            })
            .map(Ok);
        Ok(Response::new(Box::pin(bundles)))
    }
}

#[cfg(test)]
mod tests {
    use http::{Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;
    use crate::bootstrap::TokenReviewer;

    /// A signer whose TokenReviews say the token is node `bound_to`'s daemon.
    fn signer(bound_to: &'static str) -> Arc<Signer> {
        let (svc, mut handle) = mock::pair::<http::Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let mut review: Value =
                    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                        .unwrap();
                review["status"] = json!({"authenticated": true, "user": {
                    "username": "system:serviceaccount:lacewing-system:lacewing-node",
                    "extra": {"authentication.kubernetes.io/node-name": [bound_to]}}});
                let mut resp = Response::new(Body::from(serde_json::to_vec(&review).unwrap()));
                *resp.status_mut() = StatusCode::CREATED;
                send.send_response(resp);
            }
        });
        let (ca, _) = lacewing_core::pki::Ca::generate().unwrap();
        let bundle = ca.pem().to_owned();
        let authority =
            lacewing_core::trust::Authority::new(ca, bundle, std::path::Path::new("-")).unwrap();
        Arc::new(Signer {
            authority: tokio::sync::watch::channel(Arc::new(authority)).1,
            trust_domain: "cluster.local".into(),
            ttl: Duration::from_secs(60),
            node_ttl: NODE_CERT_TTL,
            snapshots: tokio::sync::watch::channel(None).1,
            bootstrap: Some(TokenReviewer {
                client: kube::Client::new(svc, "default"),
                service_account: "system:serviceaccount:lacewing-system:lacewing-node".into(),
            }),
        })
    }

    async fn bootstrap(signer: Arc<Signer>, node: &str, asks: &str) -> Result<String, Status> {
        let (_, csr_pem) = pki::new_key_and_csr(asks).unwrap();
        let resp = Server(signer)
            .bootstrap_node(Request::new(BootstrapNodeRequest {
                node: node.into(),
                token: "t".into(),
                csr_pem,
            }))
            .await?;
        Ok(resp.into_inner().cert_chain_pem[0].clone())
    }

    #[tokio::test]
    async fn a_node_bootstraps_only_its_own_identity() {
        let n1 = "spiffe://cluster.local/lacewing/node/n1";
        let cert = bootstrap(signer("n1"), "n1", n1).await.unwrap();
        assert_eq!(pki::uri_sans(&pki::pem_to_der(&cert).unwrap()), [n1]);
        // A token bound to another node.
        let err = bootstrap(signer("n2"), "n1", n1).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        // A CSR for another identity.
        let err = bootstrap(
            signer("n1"),
            "n1",
            "spiffe://cluster.local/lacewing/node/n2",
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
}
