//! `lacewing-controller`: turns what the cluster declares into each node's
//! configuration and streams it to the nodes.
//!
//! Now: the folder source (a directory of Kubernetes YAML, watched), the
//! snapshot of services every node needs, and the gRPC stream on :15012 with
//! versioned deltas, ACK/NACK and per-node applied versions. To come with the
//! rest of the control-plane issue: the Kubernetes source, CRDs, mutual TLS
//! with node identities, leader election, metrics on :15014.

pub mod config;
pub mod folder;
pub mod grpc;
pub mod snapshot;

use std::sync::Arc;

pub use config::ControllerConfig;

/// What can stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("serving gRPC on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        source: tonic::transport::Error,
    },
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(config: ControllerConfig) -> Result<(), ControllerError> {
    let (snapshots, source_error) = folder::watch(config.folder.clone());
    let registry = Arc::new(grpc::Registry::new(snapshots, source_error));
    tracing::info!(folder = %config.folder.display(), listen = %config.listen, "controller serving node configuration");
    tonic::transport::Server::builder()
        .add_service(grpc::server(registry))
        .serve_with_shutdown(config.listen, crate::shutdown::signal())
        .await
        .map_err(|source| ControllerError::Serve {
            addr: config.listen,
            source,
        })
}
