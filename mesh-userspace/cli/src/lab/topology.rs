//! Names and addresses of a lab: a pure function of its id and size.
//!
//! ```text
//!            underlay netns  lw-<id>-ul   (bridge br0, no addresses)
//!              |  10.200.0.0/24, fd98::/64
//!     +--------+---------+
//!   node n0            node n1            netns lw-<id>-n0, lw-<id>-n1
//!   10.200.0.1          10.200.0.2          pod CIDR 10.244.<n>.0/24, fd00:244:<n>::/64
//!    |p0   |p1          |p0   |p1         veths named p<i> in the node netns
//!  n0-p0  n0-p1       n1-p0  n1-p1        netns lw-<id>-n<n>-p<i>, eth0 10.244.<n>.<10+i>
//! ```
//!
//! Interface names live inside the lab's own namespaces, so two labs use the same
//! short names and addresses without colliding; only namespace, cgroup and pin
//! names carry the lab's unique prefix.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// What every lab resource name starts with.
pub const PREFIX: &str = "lw-";
/// Most nodes a lab can have (the node index is one octet of its addresses).
pub const MAX_NODES: u8 = 200;
/// Most pods per node (pod host numbers run from 10 to 10 + MAX_PODS - 1).
pub const MAX_PODS: u8 = 200;
/// First host number of pods in a node's /24 (.1 is the node's gateway).
const FIRST_POD_HOST: u8 = 10;

/// A lab's unique id: six lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LabId([u8; 6]);

impl LabId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 3];
        // /dev/urandom never blocks and is on every Linux; a clash is also
        // checked by the caller against existing namespaces.
        let ok = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .is_ok();
        if !ok {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default()
                ^ std::process::id();
            bytes.copy_from_slice(&nanos.to_le_bytes()[..3]);
        }
        let hex = format!("{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2]);
        hex.parse().expect("six hex digits")
    }

    /// `lw-<id>`: the prefix of every resource of this lab.
    pub fn prefix(&self) -> String {
        format!("{PREFIX}{self}")
    }

    /// The lab id a resource name belongs to, if it is a lab resource name
    /// (`lw-<id>` or `lw-<id>-...`).
    pub fn from_resource_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(PREFIX)?;
        let (id, tail) = rest.split_at_checked(6)?;
        if !(tail.is_empty() || tail.starts_with('-') || tail.starts_with('.')) {
            return None;
        }
        id.parse().ok()
    }
}

impl fmt::Display for LabId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).expect("ascii hex"))
    }
}

impl FromStr for LabId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix(PREFIX).unwrap_or(s);
        let bytes: [u8; 6] = s
            .as_bytes()
            .try_into()
            .map_err(|_| format!("lab id `{s}` must be six hex digits, as in `lw-3fa9c1`"))?;
        if !bytes
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(format!("lab id `{s}` must be six lowercase hex digits"));
        }
        Ok(Self(bytes))
    }
}

impl TryFrom<String> for LabId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LabId> for String {
    fn from(id: LabId) -> Self {
        id.to_string()
    }
}

/// A lab's shape: its id and how many nodes and pods it has.
/// A lab size out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("a lab has 1 to {MAX_NODES} nodes, not {0}")]
    Nodes(u8),
    #[error("a node has 0 to {MAX_PODS} pods, not {0}")]
    Pods(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub id: LabId,
    pub nodes: u8,
    pub pods_per_node: u8,
}

impl Topology {
    /// Checks the size; `Err` says what range is allowed.
    pub fn new(id: LabId, nodes: u8, pods_per_node: u8) -> Result<Self, TopologyError> {
        if nodes == 0 || nodes > MAX_NODES {
            return Err(TopologyError::Nodes(nodes));
        }
        if pods_per_node > MAX_PODS {
            return Err(TopologyError::Pods(pods_per_node));
        }
        Ok(Self {
            id,
            nodes,
            pods_per_node,
        })
    }

    /// Name of the underlay namespace (the bridge joining the nodes).
    pub fn underlay_netns(&self) -> String {
        format!("{}-ul", self.id.prefix())
    }

    pub fn nodes(&self) -> impl Iterator<Item = NodeSpec> + '_ {
        (0..self.nodes).map(|index| NodeSpec {
            lab: self.id,
            index,
        })
    }

    pub fn pods(&self) -> impl Iterator<Item = PodSpec> + '_ {
        self.nodes().flat_map(|node| node.pods(self.pods_per_node))
    }

    /// Finds a node by name (`n0`).
    pub fn node(&self, name: &str) -> Option<NodeSpec> {
        self.nodes().find(|n| n.name() == name)
    }

    /// Finds a pod by name (`n0-p1`).
    pub fn pod(&self, name: &str) -> Option<PodSpec> {
        self.pods().find(|p| p.name() == name)
    }
}

/// One node of a lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub lab: LabId,
    pub index: u8,
}

impl NodeSpec {
    /// `n<index>`.
    pub fn name(&self) -> String {
        format!("n{}", self.index)
    }
    pub fn netns(&self) -> String {
        format!("{}-{}", self.lab.prefix(), self.name())
    }
    /// The veth end in the underlay namespace (enslaved to the bridge).
    pub fn underlay_if(&self) -> String {
        self.name()
    }
    /// Outside the service CIDR (10.96.0.0/12) and the pod CIDRs.
    pub fn underlay_ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, self.index + 1)
    }
    pub fn underlay_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, u16::from(self.index) + 1)
    }
    /// Pod CIDR, IPv4 (a /24).
    pub fn pod_cidr4(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 244, self.index, 0), 24)
    }
    /// Pod CIDR, IPv6 (a /64).
    pub fn pod_cidr6(&self) -> (Ipv6Addr, u8) {
        (
            Ipv6Addr::new(0xfd00, 0x244, u16::from(self.index), 0, 0, 0, 0, 0),
            64,
        )
    }
    /// The pods' IPv4 gateway, set on every pod-facing veth of the node.
    pub fn gateway4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 1)
    }
    /// The pods' IPv6 gateway, the first address of the pod CIDR.
    pub fn gateway6(&self) -> Ipv6Addr {
        let (net, _) = self.pod_cidr6();
        let mut s = net.segments();
        s[7] = 1;
        s.into()
    }
    /// Path of the node's cgroup relative to the lab's cgroup.
    pub fn cgroup(&self) -> String {
        self.name()
    }
    /// Path of the node daemon's cgroup relative to the lab's cgroup: its
    /// own, below the node's, as a DaemonSet pod has.
    pub fn daemon_cgroup(&self) -> String {
        format!("{}/lacewing-node", self.name())
    }
    pub fn pods(&self, count: u8) -> impl Iterator<Item = PodSpec> + use<> {
        let node = *self;
        (0..count).map(move |index| PodSpec { node, index })
    }
}

/// A pod's cgroup below its node's, named by its UID as kubelet's
/// cgroupfs layout names it (where the node daemon looks for it).
pub fn kubepods_cgroup(uid: &str) -> String {
    format!("kubepods/pod{uid}")
}

/// One pod of a lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub node: NodeSpec,
    pub index: u8,
}

impl PodSpec {
    /// `n<node>-p<index>`, unique in the lab.
    pub fn name(&self) -> String {
        format!("{}-p{}", self.node.name(), self.index)
    }
    pub fn netns(&self) -> String {
        format!("{}-{}", self.node.lab.prefix(), self.name())
    }
    pub fn ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.node.index, FIRST_POD_HOST + self.index)
    }
    pub fn ip6(&self) -> Ipv6Addr {
        let (net, _) = self.node.pod_cidr6();
        let s = net.segments();
        Ipv6Addr::new(
            s[0],
            s[1],
            s[2],
            0,
            0,
            0,
            0,
            u16::from(FIRST_POD_HOST + self.index),
        )
    }
    /// The pod's UID, made up from the lab, node and pod, shaped as
    /// Kubernetes' (`0a1b2c00-0000-4000-8000-000000000102`).
    pub fn uid(&self) -> String {
        format!(
            "{}00-0000-4000-8000-{:012x}",
            self.node.lab,
            (u64::from(self.node.index) << 8) | u64::from(self.index)
        )
    }
    /// Path of the pod's cgroup relative to the lab's cgroup: below the
    /// node's, named by its UID as kubelet's cgroupfs layout names it.
    pub fn cgroup(&self) -> String {
        format!("{}/{}", self.node.cgroup(), kubepods_cgroup(&self.uid()))
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn topo() -> Topology {
        Topology::new("0a1b2c".parse().unwrap(), 2, 2).unwrap()
    }

    #[test]
    fn names_carry_the_lab_prefix() {
        let t = topo();
        assert_eq!(t.underlay_netns(), "lw-0a1b2c-ul");
        let names: Vec<_> = t.pods().map(|p| p.netns()).collect();
        assert_eq!(
            names,
            [
                "lw-0a1b2c-n0-p0",
                "lw-0a1b2c-n0-p1",
                "lw-0a1b2c-n1-p0",
                "lw-0a1b2c-n1-p1"
            ]
        );
        for name in names.iter().chain([&t.underlay_netns()]) {
            assert_eq!(LabId::from_resource_name(name), Some(t.id), "{name}");
        }
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        let t = Topology::new(LabId::random(), MAX_NODES, MAX_PODS).unwrap();
        for pod in t.pods() {
            assert!(pod.node.underlay_if().len() < 16);
        }
    }

    #[test]
    fn addresses_are_distinct_and_inside_the_node_cidr() {
        let t = Topology::new(LabId::random(), 3, 5).unwrap();
        let mut seen = std::collections::HashSet::new();
        for pod in t.pods() {
            assert!(seen.insert(IpAddr::V4(pod.ip4())), "{} reused", pod.ip4());
            assert!(seen.insert(IpAddr::V6(pod.ip6())), "{} reused", pod.ip6());
            assert_eq!(
                pod.ip4().octets()[..3],
                pod.node.pod_cidr4().0.octets()[..3]
            );
            assert_eq!(
                pod.ip6().segments()[..4],
                pod.node.pod_cidr6().0.segments()[..4]
            );
            assert_ne!(pod.ip4(), pod.node.gateway4());
        }
        assert_eq!(t.pod("n1-p2").unwrap().ip4(), Ipv4Addr::new(10, 244, 1, 12));
        assert_eq!(t.pod("n1-p2").unwrap().ip6().to_string(), "fd00:244:1::c");
    }

    #[test]
    fn ids_parse_strictly() {
        assert!("lw-0a1b2c".parse::<LabId>().is_ok());
        assert!("0A1B2C".parse::<LabId>().is_err());
        assert!("0a1b2".parse::<LabId>().is_err());
        assert_eq!(LabId::from_resource_name("lw-0a1b2cx"), None);
        assert_eq!(LabId::from_resource_name("other-0a1b2c"), None);
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(
            Topology::new(LabId::random(), 0, 1),
            Err(TopologyError::Nodes(0))
        );
        assert_eq!(
            Topology::new(LabId::random(), 201, 1)
                .unwrap_err()
                .to_string(),
            format!("a lab has 1 to {MAX_NODES} nodes, not 201")
        );
        assert!(Topology::new(LabId::random(), 1, 0).is_ok());
    }
}
