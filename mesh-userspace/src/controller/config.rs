//! `lacewing-controller` settings.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::Parser;

use crate::{pki, telemetry::LogFormat};

/// The gRPC port nodes subscribe on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// `/status` and `/metrics`.
pub const DEFAULT_HTTP: &str = "0.0.0.0:15014";

#[derive(Debug, Parser)]
#[command(
    name = "lacewing-controller",
    version,
    about = "Lacewing's control plane"
)]
pub struct ControllerArgs {
    /// A folder of Kubernetes YAML (Services, EndpointSlices, ...), watched.
    #[arg(
        long,
        env = "LACEWING_FOLDER",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub folder: Option<PathBuf>,
    /// Watch the Kubernetes API instead (in-cluster config or kubeconfig).
    #[arg(long)]
    pub kubernetes: bool,
    /// With --kubernetes: the namespace of the Lease that elects the replica
    /// writing status (every replica serves nodes).
    #[arg(long, env = "POD_NAMESPACE", default_value = "lacewing-system")]
    pub lease_namespace: String,
    /// With --kubernetes: this replica's name in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where nodes subscribe (gRPC, mutual TLS).
    #[arg(long, env = "LACEWING_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Where `/status` and `/metrics` are served (plain HTTP, read-only).
    #[arg(long, env = "LACEWING_HTTP_ADDR", default_value = DEFAULT_HTTP)]
    pub http_addr: SocketAddr,
    /// Folder of the control-plane CA (`ca/`, created on first start) and of
    /// the controller's certificate (`controller/`).
    #[arg(
        long,
        env = "LACEWING_PKI_DIR",
        default_value = "/var/lib/lacewing/pki"
    )]
    pub pki_dir: PathBuf,
    /// Addresses nodes dial, put in the controller's certificate (besides
    /// the name `lacewing-controller`).
    #[arg(long, value_delimiter = ',')]
    pub server_ip: Vec<IpAddr>,
    #[arg(long, env = "LACEWING_TRUST_DOMAIN", default_value = pki::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// Where the controller reads what the cluster declares.
#[derive(Clone, Debug)]
pub enum Source {
    Folder(PathBuf),
    Kubernetes {
        lease_namespace: String,
        identity: String,
    },
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub source: Source,
    pub listen: SocketAddr,
    pub http_addr: SocketAddr,
    pub pki_dir: PathBuf,
    pub server_ips: Vec<IpAddr>,
    pub trust_domain: String,
}

impl ControllerArgs {
    pub fn validate(self) -> Result<ControllerConfig, String> {
        let source = match self.folder {
            Some(folder) if !folder.is_dir() => {
                return Err(format!("--folder {}: no such directory", folder.display()));
            }
            Some(folder) => Source::Folder(folder),
            None => Source::Kubernetes {
                lease_namespace: self.lease_namespace,
                identity: match self.identity {
                    Some(id) if !id.is_empty() => id,
                    _ => crate::sys::hostname(),
                },
            },
        };
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            return Err(format!(
                "--trust-domain `{}` must be a name such as cluster.local",
                self.trust_domain
            ));
        }
        Ok(ControllerConfig {
            source,
            listen: self.listen,
            http_addr: self.http_addr,
            pki_dir: self.pki_dir,
            server_ips: self.server_ip,
            trust_domain: self.trust_domain,
        })
    }
}
