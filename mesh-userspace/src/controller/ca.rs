//! The `CertificateService`: signs a workload identity for the node its pod
//! runs on, and for no other. The pod must be in the latest configuration,
//! scheduled on the node the client certificate names; the identity comes
//! from the pod's namespace and service account, never from the request.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};

use super::{grpc::certified_node, snapshot::Snapshots};
use crate::{
    pki::{self, Ca},
    proto::ca_pb::{
        CreateCertificateRequest, CreateCertificateResponse,
        certificate_service_server::{CertificateService, CertificateServiceServer},
    },
};

pub struct Signer {
    pub ca: Ca,
    pub trust_domain: String,
    /// Workload certificate lifetime.
    pub ttl: Duration,
    pub snapshots: Snapshots,
}

pub fn server(signer: Arc<Signer>) -> CertificateServiceServer<Server> {
    CertificateServiceServer::new(Server(signer))
}

pub struct Server(Arc<Signer>);

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
        let cert = signer
            .ca
            .sign_workload(&req.csr_pem, &identity, signer.ttl)
            .map_err(|e| match e {
                pki::PkiError::BadRequest(m) => Status::invalid_argument(m),
                other => Status::internal(other.to_string()),
            })?;
        tracing::info!(%node, pod = %key, %identity, "signed a workload certificate");
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: vec![cert],
            trust_bundle_pem: signer.ca.pem().to_owned(),
        }))
    }
}
