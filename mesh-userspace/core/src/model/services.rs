//! The node's service model: what `LoadBalancer::apply` takes. Whatever the
//! source (a file of Kubernetes YAML now, the controller's stream later), it is
//! translated into this once.

use std::{collections::BTreeSet, fmt, net::SocketAddr};

use mesh_common::{
    lb::{MAGLEV_DEFAULT_SIZE, PROTO_TCP, PROTO_UDP, SvcKey},
    maglev,
};

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// How a backend is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Random, weighted by each backend's weight (kube-proxy's behaviour, with
    /// weights).
    Random,
    /// Maglev consistent hashing over a table of `table_size` entries (prime).
    Maglev { table_size: u32 },
}

impl Algorithm {
    pub const fn maglev_default() -> Self {
        Self::Maglev {
            table_size: MAGLEV_DEFAULT_SIZE,
        }
    }
}

/// One backend of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendEntry {
    pub addr: SocketAddr,
    /// Relative weight, at least 1.
    pub weight: u16,
}

/// What a Service port says it speaks: its `appProtocol`, else its name's
/// prefix (as Istio reads port names). Decides whether HTTP routes can
/// apply to it and whether its first bytes must be read to tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AppProtocol {
    /// Not said: a routed frontend's connections are sniffed.
    #[default]
    Unknown,
    /// HTTP/1.1, h2c or gRPC (`http`, `kubernetes.io/h2c`, `grpc`, ...).
    Http,
    /// Something else (`tcp`, `mysql`, `https`, ...): never read as HTTP,
    /// never routed.
    Opaque,
}

impl AppProtocol {
    /// From a port's `appProtocol` and name.
    pub fn of_port(app_protocol: Option<&str>, name: Option<&str>) -> Self {
        const HTTP: [&str; 7] = [
            "http",
            "http2",
            "h2c",
            "grpc",
            "grpc-web",
            "kubernetes.io/h2c",
            "kubernetes.io/ws",
        ];
        if let Some(declared) = app_protocol.filter(|a| !a.is_empty()) {
            let declared = declared.to_ascii_lowercase();
            return if HTTP.contains(&declared.as_str()) {
                Self::Http
            } else {
                Self::Opaque
            };
        }
        let Some(name) = name else {
            return Self::Unknown;
        };
        let prefix = name
            .split('-')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match prefix.as_str() {
            "http" | "http2" | "h2c" | "grpc" => Self::Http,
            "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" => Self::Opaque,
            _ => Self::Unknown,
        }
    }

    /// As the protocol between controller and nodes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "",
            Self::Http => "http",
            Self::Opaque => "opaque",
        }
    }

    pub fn parse(text: &str) -> Self {
        match text {
            "http" => Self::Http,
            "opaque" => Self::Opaque,
            _ => Self::Unknown,
        }
    }
}

/// A Service (namespace, name).
pub type ServiceId = (String, String);

/// One service frontend (a ClusterIP, port and protocol) with its ready backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// `namespace/name:port`, for metrics and logs.
    pub name: String,
    pub frontend: SocketAddr,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    /// ClientIP affinity timeout in seconds; 0: no affinity.
    pub affinity_timeout_s: u32,
    /// Ready backends only; empty means connects are refused.
    pub backends: Vec<BackendEntry>,
    /// What the port says it speaks (for routing, not for the kernel).
    pub app_protocol: AppProtocol,
}

impl ServiceEntry {
    /// The Service this is a frontend of, and the Service port's number
    /// (the name is `namespace/name:port`, the port by name or number).
    pub fn service_port(&self) -> Option<(ServiceId, u16)> {
        let (ns, rest) = self.name.split_once('/')?;
        let (svc, port) = match rest.rsplit_once(':') {
            Some((svc, port)) => (svc, port.parse().ok()),
            None => (rest, None),
        };
        Some((
            (ns.to_owned(), svc.to_owned()),
            port.unwrap_or(self.frontend.port()),
        ))
    }

    pub fn key(&self) -> SvcKey {
        svc_key(self.frontend, self.protocol)
    }

    /// Whether the datapath would be the same (the name is only a label;
    /// backend order does not matter).
    pub fn same_datapath(&self, other: &Self) -> bool {
        let sorted = |v: &[BackendEntry]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        self.frontend == other.frontend
            && self.protocol == other.protocol
            && self.algorithm == other.algorithm
            && self.affinity_timeout_s == other.affinity_timeout_s
            && sorted(&self.backends) == sorted(&other.backends)
    }

    /// The same entry with backends in a fixed order, so the Maglev table and
    /// the slot layout do not depend on the order the source listed them in.
    pub fn normalized(&self) -> Self {
        let mut e = self.clone();
        e.backends.sort();
        e
    }
}

/// The map key of a frontend.
/// A service frontend's identity: what the client dials, and over what.
pub type FrontendKey = (SocketAddr, Protocol);

pub fn svc_key(addr: SocketAddr, protocol: Protocol) -> SvcKey {
    match addr {
        SocketAddr::V4(a) => SvcKey::v4(a.ip().octets(), a.port(), protocol.number()),
        SocketAddr::V6(a) => SvcKey::v6(a.ip().octets(), a.port(), protocol.number()),
    }
}

/// Everything the node balances: all services, as a whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSet {
    pub services: Vec<ServiceEntry>,
}

/// Why a service set was rejected. Nothing of a rejected set is applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidService {
    #[error("{0}: frontend {1} {2} is defined twice")]
    Duplicate(String, SocketAddr, Protocol),
    #[error("{name}: backend {backend} is not of the frontend's address family ({frontend})")]
    FamilyMismatch {
        name: String,
        backend: SocketAddr,
        frontend: SocketAddr,
    },
    #[error("{0}: backend {1} has weight 0; weights start at 1")]
    ZeroWeight(String, SocketAddr),
    #[error("{0}: backend {1} is listed twice")]
    DuplicateBackend(String, SocketAddr),
    #[error("{0}: Maglev table size {1} must be a prime between 2 and 131071 (default 16381)")]
    MaglevSize(String, u32),
    #[error("{0}: the frontend port must not be 0")]
    ZeroPort(String),
}

impl ServiceSet {
    /// Checks the whole set; the first problem found, saying what to fix.
    pub fn validate(&self) -> Result<(), InvalidService> {
        let mut frontends = BTreeSet::new();
        for s in &self.services {
            if s.frontend.port() == 0 {
                return Err(InvalidService::ZeroPort(s.name.clone()));
            }
            if !frontends.insert((s.frontend, s.protocol)) {
                return Err(InvalidService::Duplicate(
                    s.name.clone(),
                    s.frontend,
                    s.protocol,
                ));
            }
            if let Algorithm::Maglev { table_size } = s.algorithm
                && (table_size > 131_071 || !maglev::is_prime(table_size))
            {
                return Err(InvalidService::MaglevSize(s.name.clone(), table_size));
            }
            let mut seen = BTreeSet::new();
            for b in &s.backends {
                if b.addr.is_ipv4() != s.frontend.is_ipv4() {
                    return Err(InvalidService::FamilyMismatch {
                        name: s.name.clone(),
                        backend: b.addr,
                        frontend: s.frontend,
                    });
                }
                if b.weight == 0 {
                    return Err(InvalidService::ZeroWeight(s.name.clone(), b.addr));
                }
                if !seen.insert(b.addr) {
                    return Err(InvalidService::DuplicateBackend(s.name.clone(), b.addr));
                }
            }
        }
        Ok(())
    }
}

/// A service CIDR (`10.96.0.0/12`): where ClusterIPs are allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceCidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// A service CIDR that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not a CIDR such as 10.96.0.0/12")]
    Shape(String),
    #[error("`{addr}` in `{cidr}` is not an IP address")]
    Address { addr: String, cidr: String },
    #[error("prefix `{prefix}` in `{cidr}` must be 0 to {max}")]
    Prefix {
        prefix: String,
        cidr: String,
        max: u8,
    },
}

impl std::str::FromStr for ServiceCidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Shape(s.to_owned()))?;
        let addr: std::net::IpAddr = addr.parse().map_err(|_| CidrError::Address {
            addr: addr.to_owned(),
            cidr: s.to_owned(),
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 =
            prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| CidrError::Prefix {
                    prefix: prefix.to_owned(),
                    cidr: s.to_owned(),
                    max,
                })?;
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::AppProtocol;

    #[test]
    fn app_protocol_comes_from_app_protocol_then_the_port_name() {
        let of = AppProtocol::of_port;
        assert_eq!(of(Some("kubernetes.io/h2c"), None), AppProtocol::Http);
        assert_eq!(of(Some("grpc"), Some("tcp-x")), AppProtocol::Http);
        // A declared protocol wins over the name, and anything else is not
        // HTTP.
        assert_eq!(of(Some("mysql"), Some("http")), AppProtocol::Opaque);
        assert_eq!(of(None, Some("http-api")), AppProtocol::Http);
        assert_eq!(of(None, Some("grpc")), AppProtocol::Http);
        assert_eq!(of(None, Some("mysql")), AppProtocol::Opaque);
        assert_eq!(of(None, Some("tcp-db")), AppProtocol::Opaque);
        assert_eq!(of(None, Some("db")), AppProtocol::Unknown);
        assert_eq!(of(None, None), AppProtocol::Unknown);
        for p in [AppProtocol::Unknown, AppProtocol::Http, AppProtocol::Opaque] {
            assert_eq!(AppProtocol::parse(p.as_str()), p);
        }
    }
}
