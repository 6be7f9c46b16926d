//! `lacewing-controller` settings.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;

use lacewing_core::pki;
use lacewing_sys::telemetry::LogFormat;

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
    /// With --kubernetes: the node daemons' ServiceAccount (in the
    /// controller's namespace), whose tokens may bootstrap node certificates.
    #[arg(long, default_value = "lacewing-node")]
    pub node_service_account: String,
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
    /// Lifetime of workload certificates (`24h`, `30m`, `10s`); nodes renew
    /// them at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,
    /// Lifetime of node certificates (`30d`; the tests use seconds): the
    /// controller signs a node's bootstrap and renewals for this long, and
    /// the node renews at half of it.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub node_cert_ttl: Duration,
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// What one peer may hold on :15012 and :15014.
    #[command(flatten)]
    pub limits: lacewing_tunnel::limits::LimitFlags,
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
    pub workload_cert_ttl: Duration,
    pub node_cert_ttl: Duration,
    pub node_service_account: String,
    pub limits: lacewing_sys::admission::Limits,
}

pub use lacewing_core::duration::parse as parse_duration;

/// A setting that cannot be used, and what to do about it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--folder {}: no such directory", .0.display())]
    NoFolder(std::path::PathBuf),
    #[error("--trust-domain `{0}` must be a name such as cluster.local")]
    TrustDomain(String),
}

impl ControllerArgs {
    pub fn validate(self) -> Result<ControllerConfig, ConfigError> {
        let source = match self.folder {
            Some(folder) if !folder.is_dir() => {
                return Err(ConfigError::NoFolder(folder));
            }
            Some(folder) => Source::Folder(folder),
            None => Source::Kubernetes {
                lease_namespace: self.lease_namespace,
                identity: match self.identity {
                    Some(id) if !id.is_empty() => id,
                    _ => lacewing_sys::os::hostname(),
                },
            },
        };
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            return Err(ConfigError::TrustDomain(self.trust_domain));
        }
        Ok(ControllerConfig {
            source,
            listen: self.listen,
            http_addr: self.http_addr,
            pki_dir: self.pki_dir,
            server_ips: self.server_ip,
            trust_domain: self.trust_domain,
            workload_cert_ttl: self.workload_cert_ttl,
            node_cert_ttl: self.node_cert_ttl,
            node_service_account: self.node_service_account,
            limits: self.limits.limits(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::ControllerArgs::command().debug_assert();
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        use std::time::Duration;
        assert_eq!(
            super::parse_duration("24h"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(super::parse_duration("4s"), Ok(Duration::from_secs(4)));
        use lacewing_core::duration::DurationError;
        assert_eq!(
            super::parse_duration("0s"),
            Err(DurationError::Zero("0s".to_owned()))
        );
        assert_eq!(
            super::parse_duration("10x").unwrap_err().to_string(),
            "`10x`: the unit must be s, m, h or d"
        );
        assert_eq!(
            super::parse_duration("99999999999999999d"),
            Err(DurationError::TooLong("99999999999999999d".to_owned()))
        );
    }
}
