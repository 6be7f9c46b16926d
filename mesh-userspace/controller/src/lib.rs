//! `lacewing-controller`: turns what the cluster declares into each node's
//! configuration and streams it to the nodes.
//!
//! The folder source (a directory of Kubernetes YAML, watched) or the
//! Kubernetes source (kube-rs watchers), the snapshot every node needs (all
//! services, its own workloads), the gRPC stream on :15012 with mutual TLS (a
//! node subscribes only as the node its certificate names), versioned
//! deltas, ACK/NACK, and per-node applied versions on :15014 (`/status`,
//! `/metrics`). With Kubernetes, any number of replicas serve nodes and the
//! one holding the Lease writes policy status.

pub mod authority;
pub mod bootstrap;
pub mod ca;
pub mod ca_store;
pub mod config;
pub mod folder;
pub mod grpc;
pub mod kube_source;
pub mod leader;
pub mod listener;
pub mod metrics;
pub mod snapshot;
pub mod status;

use std::sync::{Arc, atomic::AtomicBool};

pub use config::ControllerConfig;
use std::time::Duration;

use lacewing_core::{pki, trust};
use lacewing_sys::admission::{Admission, AdmissionMetrics};
use lacewing_tunnel::tls::{self, ClientCert};

/// How often an idle node connection is pinged, and how long the node has
/// to answer before the connection is closed as dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one node connection may have open: a node holds one
/// subscription and asks for certificates a few at a time.
const MAX_STREAMS: u32 = 100;

/// What can stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("serving gRPC on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the controller's certificate cannot serve TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("serving /status and /metrics on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to the Kubernetes API: {0} (run in a cluster, or set KUBECONFIG)")]
    Kube(kube::Error),
    #[error("certificates in {dir}: {source}")]
    Pki {
        dir: std::path::PathBuf,
        source: pki::PkiError,
    },
    #[error("the mesh CA: {0}")]
    CaStore(#[from] ca_store::CaStoreError),
    #[error("the CA in {dir}: {source}")]
    Trust {
        dir: std::path::PathBuf,
        source: lacewing_core::trust::TrustError,
    },
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(config: ControllerConfig) -> Result<(), ControllerError> {
    // The CA: a Secret in Kubernetes (shared by every replica), a file in
    // folder mode.
    let client = match &config.source {
        config::Source::Kubernetes { .. } => Some(
            kube::Client::try_default()
                .await
                .map_err(ControllerError::Kube)?,
        ),
        config::Source::Folder(_) => None,
    };
    let pki_dir = config.pki_dir.clone();
    let pki_err = move |source| ControllerError::Pki {
        dir: pki_dir.clone(),
        source,
    };
    let mut prom = prometheus_client::registry::Registry::default();
    let authority_metrics = authority::AuthorityMetrics::new(&mut prom);
    // Tasks that end with the controller.
    let mut background = Vec::new();
    let mut _fixed_authority = None;
    let authorities = match (&config.source, &client) {
        (
            config::Source::Kubernetes {
                lease_namespace, ..
            },
            Some(client),
        ) => {
            let authority = ca_store::load_or_create(client.clone(), lease_namespace).await?;
            ca_store::publish_root(client.clone(), lease_namespace, &authority).await?;
            let (keep, authorities) = authority::fixed(authority, &authority_metrics);
            _fixed_authority = Some(keep);
            authorities
        }
        _ => {
            let dir = config.pki_dir.join("ca");
            pki::Ca::load_or_create(&dir).map_err(&pki_err)?;
            let initial =
                trust::Authority::load(&dir).map_err(|source| ControllerError::Trust {
                    dir: dir.clone(),
                    source,
                })?;
            let (authorities, task) = authority::watch_folder(dir, initial, authority_metrics);
            background.push(task);
            authorities
        }
    };
    let tls = server_tls(&config, &authorities.borrow(), &pki_err)?;
    let (tls_tx, tls_rx) = tokio::sync::watch::channel(Arc::new(tls));
    // A new CA or bundle: the controller's own certificate is issued again
    // by the signer in force, and new handshakes check nodes against the
    // new bundle.
    background.push(tokio::spawn({
        let mut authorities = authorities.clone();
        let config = config.clone();
        let pki_err = pki_err.clone();
        async move {
            while authorities.changed().await.is_ok() {
                let authority = Arc::clone(&authorities.borrow_and_update());
                match server_tls(&config, &authority, &pki_err) {
                    Ok(tls) => {
                        tls_tx.send_replace(Arc::new(tls));
                        tracing::info!("the controller's certificate follows the CA folder");
                    }
                    Err(err) => tracing::warn!(%err, "the controller keeps its certificate: the new CA cannot issue it"),
                }
            }
        }
    }));
    let (snapshots, source_error) = match &config.source {
        config::Source::Folder(dir) => folder::watch(dir.clone()),
        config::Source::Kubernetes {
            lease_namespace,
            identity,
        } => {
            let client = client
                .clone()
                .expect("made above for the Kubernetes source");
            let (snapshots, errors, verdicts) = kube_source::watch(client.clone());
            let (leader, election) = leader::elect(
                client.clone(),
                leader::LeaseConfig::new(lease_namespace.clone(), identity.clone()),
            );
            background.push(election);
            background.push(tokio::spawn(status::write(client, verdicts, leader)));
            (snapshots, errors)
        }
    };
    let signer = Arc::new(ca::Signer {
        authority: authorities,
        trust_domain: config.trust_domain.clone(),
        ttl: config.workload_cert_ttl,
        node_ttl: config.node_cert_ttl,
        snapshots: snapshots.clone(),
        bootstrap: match (&config.source, &client) {
            (
                config::Source::Kubernetes {
                    lease_namespace, ..
                },
                Some(client),
            ) => Some(bootstrap::TokenReviewer {
                client: client.clone(),
                service_account: format!(
                    "system:serviceaccount:{lease_namespace}:{}",
                    config.node_service_account
                ),
            }),
            _ => None,
        },
    });
    let registry = Arc::new(grpc::Registry::new(
        config.trust_domain.clone(),
        snapshots,
        source_error,
    ));

    metrics::register(&mut prom, Arc::clone(&registry));
    let admission_metrics = AdmissionMetrics::new(&mut prom);
    match lacewing_sys::os::raise_fd_limit() {
        Ok(limit) => {
            tracing::info!(limit, "open-file limit");
            admission_metrics.set_file_limit(limit);
        }
        Err(err) => tracing::warn!(%err, "could not raise the open-file limit"),
    }
    let admission =
        |listener| Admission::new(listener, config.limits.clone(), admission_metrics.clone());
    let status_of = Arc::clone(&registry);
    let endpoint = Arc::new(lacewing_sys::http::Endpoint {
        registry: prom,
        ready: AtomicBool::new(true),
        status: Some(Box::new(move || {
            serde_json::to_string(&status_of.status()).unwrap_or_default()
        })),
        routes: None,
    });
    let http = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map(|listener| {
            lacewing_sys::http::serve(
                listener,
                endpoint,
                std::future::ready(()),
                admission("metrics"),
            )
        })
        .map_err(|source| ControllerError::Http {
            addr: config.http_addr,
            source,
        })?;

    tracing::info!(source = ?config.source, listen = %config.listen, "controller serving node configuration (mutual TLS)");
    // The daemons' accept queue (tokio's is 1,024): a burst of nodes, or of
    // hostile connections, waits in it instead of being dropped.
    let listener = lacewing_sys::net::listen(config.listen)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .map_err(|source| ControllerError::Listen {
            addr: config.listen,
            source,
        })?;
    let incoming = listener::incoming(listener, tls_rx, admission("controller"));
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(config.limits.max_header_bytes)
        .max_concurrent_streams(MAX_STREAMS)
        .add_service(grpc::server(registry))
        .add_service(ca::server(signer))
        .serve_with_incoming_shutdown(incoming, lacewing_sys::shutdown::signal())
        .await
        .map_err(|source| ControllerError::Serve {
            addr: config.listen,
            source,
        });
    http.abort();
    for task in background {
        task.abort();
    }
    result
}

/// The controller's own certificate, from the signing CA; clients must
/// present a certificate that chains to the trust bundle.
fn server_tls(
    config: &ControllerConfig,
    authority: &trust::Authority,
    pki_err: &impl Fn(pki::PkiError) -> ControllerError,
) -> Result<rustls::ServerConfig, ControllerError> {
    let server_dir = config.pki_dir.join("controller");
    authority
        .signer
        .issue_controller(&server_dir, &config.server_ips)
        .map_err(pki_err)?;
    let (_, cert, key) = pki::read_credentials(&server_dir).map_err(pki_err)?;
    // Optional so a node without a certificate can bootstrap one; every
    // other call refuses a caller without a node certificate.
    let roots = tls::roots(&authority.bundle_pem)?;
    Ok(tls::server_config(
        &cert,
        &key,
        roots,
        ClientCert::Optional,
    )?)
}
