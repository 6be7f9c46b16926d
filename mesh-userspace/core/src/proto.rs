//! The controller-node protocol (`proto/lacewing/config/v1/config.proto`,
//! compiled by tonic-build) and conversions to and from the model.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::model::{
    authorization::Policy,
    routes::AcceptedRoute,
    services::{Algorithm, AppProtocol, BackendEntry, Protocol, ServiceEntry},
    traffic::AcceptedTraffic,
    workloads::{PeerEntry, Workload},
};

pub mod chunks;

#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("lacewing.config.v1");
}

#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod ca_pb {
    tonic::include_proto!("lacewing.ca.v1");
}

/// A message that does not describe a valid service.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad update: {0}")]
pub struct BadMessage(pub String);

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from(bytes: &[u8]) -> Result<IpAddr, BadMessage> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let octets: [u8; 16] = bytes.try_into().expect("16 bytes");
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        n => Err(BadMessage(format!("an address has {n} bytes, not 4 or 16"))),
    }
}

fn port(p: u32) -> Result<u16, BadMessage> {
    u16::try_from(p).map_err(|_| BadMessage(format!("port {p} is out of range")))
}

pub fn key_of(frontend: SocketAddr, protocol: Protocol) -> pb::ServiceKey {
    pb::ServiceKey {
        address: ip_bytes(frontend.ip()),
        port: u32::from(frontend.port()),
        protocol: match protocol {
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
        } as i32,
    }
}

/// The frontend and protocol a key names.
pub fn key_from(key: &pb::ServiceKey) -> Result<(SocketAddr, Protocol), BadMessage> {
    let protocol = match pb::Protocol::try_from(key.protocol) {
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Udp) => Protocol::Udp,
        _ => {
            return Err(BadMessage(format!(
                "protocol {} is not TCP or UDP",
                key.protocol
            )));
        }
    };
    Ok((
        SocketAddr::new(ip_from(&key.address)?, port(key.port)?),
        protocol,
    ))
}

impl From<&ServiceEntry> for pb::Service {
    fn from(s: &ServiceEntry) -> Self {
        Self {
            key: Some(key_of(s.frontend, s.protocol)),
            name: s.name.clone(),
            maglev_table_size: match s.algorithm {
                Algorithm::Random => 0,
                Algorithm::Maglev { table_size } => table_size,
            },
            affinity_timeout_s: s.affinity_timeout_s,
            app_protocol: s.app_protocol.as_str().to_owned(),
            backends: s
                .backends
                .iter()
                .map(|b| pb::Backend {
                    address: ip_bytes(b.addr.ip()),
                    port: u32::from(b.addr.port()),
                    weight: u32::from(b.weight),
                })
                .collect(),
        }
    }
}

impl TryFrom<&pb::Service> for ServiceEntry {
    type Error = BadMessage;
    fn try_from(s: &pb::Service) -> Result<Self, BadMessage> {
        let key = s
            .key
            .as_ref()
            .ok_or_else(|| BadMessage(format!("{}: no key", s.name)))?;
        let (frontend, protocol) = key_from(key)?;
        let backends = s
            .backends
            .iter()
            .map(|b| {
                Ok(BackendEntry {
                    addr: SocketAddr::new(ip_from(&b.address)?, port(b.port)?),
                    weight: u16::try_from(b.weight).map_err(|_| {
                        BadMessage(format!("{}: weight {} is out of range", s.name, b.weight))
                    })?,
                })
            })
            .collect::<Result<_, BadMessage>>()?;
        Ok(Self {
            name: s.name.clone(),
            frontend,
            protocol,
            algorithm: match s.maglev_table_size {
                0 => Algorithm::Random,
                table_size => Algorithm::Maglev { table_size },
            },
            affinity_timeout_s: s.affinity_timeout_s,
            backends,
            app_protocol: AppProtocol::parse(&s.app_protocol),
        })
    }
}

impl From<&Workload> for pb::Workload {
    fn from(w: &Workload) -> Self {
        Self {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            uid: w.uid.clone(),
            service_account: w.service_account.clone(),
            addresses: w.addresses.iter().map(|a| ip_bytes(*a)).collect(),
            meshed: w.meshed,
            labels: w.labels.clone().into_iter().collect(),
            strict: w.strict,
            access_log: w.access_log,
        }
    }
}

pub fn peer_of(address: IpAddr, p: &PeerEntry) -> pb::Peer {
    pb::Peer {
        address: ip_bytes(address),
        namespace: p.namespace.clone(),
        service_account: p.service_account.clone(),
        node: p.node.clone(),
        node_address: ip_bytes(p.node_address),
    }
}

pub fn peer_from(p: &pb::Peer) -> Result<(IpAddr, PeerEntry), BadMessage> {
    Ok((
        ip_from(&p.address)?,
        PeerEntry {
            namespace: p.namespace.clone(),
            service_account: p.service_account.clone(),
            node: p.node.clone(),
            node_address: ip_from(&p.node_address)?,
        },
    ))
}

pub fn policy_of(p: &Policy) -> pb::Policy {
    pb::Policy {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        spec_json: serde_json::to_string(&p.spec).unwrap_or_default(),
    }
}

pub fn policy_from(p: &pb::Policy) -> Result<Policy, BadMessage> {
    Ok(Policy {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        spec: serde_json::from_str(&p.spec_json)
            .map_err(|e| BadMessage(format!("policy {}/{}: {e}", p.namespace, p.name)))?,
    })
}

pub fn route_of(r: &AcceptedRoute) -> pb::Route {
    pb::Route {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        created: r.created,
        spec_json: serde_json::to_string(&r.spec).expect("a route spec serializes"),
    }
}

pub fn route_from(r: &pb::Route) -> Result<AcceptedRoute, BadMessage> {
    Ok(AcceptedRoute {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        created: r.created,
        spec: serde_json::from_str(&r.spec_json)
            .map_err(|e| BadMessage(format!("route {}/{}: {e}", r.namespace, r.name)))?,
    })
}

pub fn traffic_of(t: &AcceptedTraffic) -> pb::TrafficPolicy {
    pb::TrafficPolicy {
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        spec_json: serde_json::to_string(&t.spec).expect("a policy spec serializes"),
    }
}

pub fn traffic_from(t: &pb::TrafficPolicy) -> Result<AcceptedTraffic, BadMessage> {
    Ok(AcceptedTraffic {
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        spec: serde_json::from_str(&t.spec_json)
            .map_err(|e| BadMessage(format!("traffic policy {}/{}: {e}", t.namespace, t.name)))?,
    })
}

pub fn address_from(bytes: &[u8]) -> Result<IpAddr, BadMessage> {
    ip_from(bytes)
}

pub fn address_bytes(ip: IpAddr) -> Vec<u8> {
    ip_bytes(ip)
}

/// A workload sent to `node` (only the node's own are sent).
pub fn workload_from(w: &pb::Workload, node: &str) -> Result<Workload, BadMessage> {
    if w.namespace.is_empty() || w.name.is_empty() || w.service_account.is_empty() {
        return Err(BadMessage(format!(
            "workload `{}/{}` lacks a namespace, name or service account",
            w.namespace, w.name
        )));
    }
    Ok(Workload {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        uid: w.uid.clone(),
        node: node.to_owned(),
        service_account: w.service_account.clone(),
        addresses: w
            .addresses
            .iter()
            .map(|a| ip_from(a))
            .collect::<Result<_, _>>()?,
        meshed: w.meshed,
        labels: w.labels.clone().into_iter().collect(),
        strict: w.strict,
        access_log: w.access_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_survive_the_wire_both_families() {
        for (frontend, backend) in [
            ("10.96.0.10:80", "10.244.1.10:8080"),
            ("[fd00:96::10]:53", "[fd00:244:1::a]:5353"),
        ] {
            let s = ServiceEntry {
                name: "default/web:http".into(),
                frontend: frontend.parse().unwrap(),
                protocol: Protocol::Udp,
                algorithm: Algorithm::Maglev { table_size: 251 },
                affinity_timeout_s: 30,
                backends: vec![BackendEntry {
                    addr: backend.parse().unwrap(),
                    weight: 2,
                }],
                app_protocol: AppProtocol::Http,
            };
            assert_eq!(ServiceEntry::try_from(&pb::Service::from(&s)).unwrap(), s);
        }
        let bad = pb::Service {
            key: Some(pb::ServiceKey {
                address: vec![1, 2, 3],
                port: 80,
                protocol: 1,
            }),
            ..Default::default()
        };
        assert!(
            ServiceEntry::try_from(&bad)
                .unwrap_err()
                .0
                .contains("3 bytes")
        );
    }
}
