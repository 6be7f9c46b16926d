//! Names of maps and programs, in one place.
//!
//! The kernel cuts object names to 15 bytes (`BPF_OBJ_NAME_LEN - 1`), so every
//! name here fits in 15 characters and stays readable in `bpftool map list`. The
//! kernel crate declares its statics and functions with these exact names (a
//! proc-macro attribute cannot take a const); userspace looks them up through
//! these consts, and a test checks the compiled object has each of them.

/// Services by (address, port, protocol).
pub const MAP_SERVICES: &str = "LW_SERVICES";
/// Backends by id.
pub const MAP_BACKENDS: &str = "LW_BACKENDS";
/// Weighted backend slots of random services with more than
/// `lb::INLINE_SLOTS`: an array per (service, generation), in a hash of maps.
pub const MAP_SLOTS: &str = "LW_SLOTS";
/// Maglev lookup tables: an array per (service, generation), in a hash of maps.
pub const MAP_MAGLEV: &str = "LW_MAGLEV";
/// ClientIP session affinity (expired entries swept by the daemon).
pub const MAP_AFFINITY: &str = "LW_AFFINITY";
/// Reverse translation for getpeername and UDP replies (LRU).
pub const MAP_REVNAT: &str = "LW_REVNAT";
/// Socket storage: a TCP socket's translation, for getpeername.
pub const MAP_SOCK_REVNAT: &str = "LW_SOCK_REVNAT";
/// Per-CPU counters per service.
pub const MAP_SVC_STATS: &str = "LW_SVC_STATS";
/// Service CIDRs: connects to an address in one that is no service are refused.
pub const MAP_SVC_CIDRS: &str = "LW_SVC_CIDRS";

/// Network namespaces of meshed pods (by netns cookie): their outbound TCP
/// is captured.
pub const MAP_MESHED_NETNS: &str = "LW_MESHED_NETNS";
/// A captured connection's original destination, by (netns, client port):
/// what the daemon reads for each accepted connection.
pub const MAP_CAPTURED: &str = "LW_CAPTURED";
/// STRICT pods' addresses, to the daemon's in-pod plain-text listener.
pub const MAP_INBOUND: &str = "LW_INBOUND";
/// The node's own addresses: its connections to pods are not steered.
pub const MAP_NODE_ADDRS: &str = "LW_NODE_ADDRS";
/// The sk_lookup program, attached to each STRICT pod's network namespace.
pub const SK_LOOKUP_PROGRAM: &str = "lw_sk_lookup";
/// The sock_ops program, attached at the node's cgroup.
pub const SOCK_OPS_PROGRAM: &str = "lw_sockops";
/// The sk_msg program, attached to `LW_SPLICE`: moves each write of a
/// local hop's socket to its peer.
pub const SK_MSG_PROGRAM: &str = "lw_sk_msg";
/// The app's or pod's end of local hops (sockhash, by `splice::SpliceKey`).
pub const MAP_SPLICE: &str = "LW_SPLICE";
/// The daemon's end of local hops (sockhash).
pub const MAP_SPLICE_TO: &str = "LW_SPLICE_TO";
/// Senders no longer spliced (LRU hash).
pub const MAP_SPLICE_OFF: &str = "LW_SPLICE_OFF";
/// Node-wide switches (`splice::Settings`): acceleration on or off.
pub const MAP_SETTINGS: &str = "LW_SETTINGS";
/// Per-CPU counters of sockets added to `LW_SPLICE`, by leg.
pub const MAP_SPLICE_STATS: &str = "LW_SPLICE_STATS";
/// Meshed pods on this node by address (`fastpath::LocalPod`).
pub const MAP_LOCAL_PODS: &str = "LW_LOCAL_PODS";
/// Fast-path verdicts by (source identity, destination pod).
pub const MAP_PAIR_POLICY: &str = "LW_PAIR_POLICY";
/// Per-CPU counters of the connect hook's fast-path decisions.
pub const MAP_FAST_STATS: &str = "LW_FAST_STATS";

/// `SO_MARK` of the node daemon's own sockets ("LW"): the capture programs
/// never redirect them.
pub const BYPASS_MARK: u32 = 0x4c57;
/// `SO_MARK` of the daemon's connections to pods on its own node: not
/// captured either, and spliced with the pod's socket when acceleration is on.
pub const DELIVERY_MARK: u32 = 0x4c58;

/// Whether `mark` is one the daemon puts on its own sockets.
pub const fn is_daemon_mark(mark: u32) -> bool {
    mark == BYPASS_MARK || mark == DELIVERY_MARK
}

/// Every map the node daemon pins.
pub const ALL_MAPS: &[&str] = &[
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_SLOTS,
    MAP_MAGLEV,
    MAP_AFFINITY,
    MAP_REVNAT,
    MAP_SOCK_REVNAT,
    MAP_SVC_STATS,
    MAP_SVC_CIDRS,
    MAP_MESHED_NETNS,
    MAP_CAPTURED,
    MAP_INBOUND,
    MAP_NODE_ADDRS,
    MAP_SPLICE,
    MAP_SPLICE_TO,
    MAP_SPLICE_OFF,
    MAP_SETTINGS,
    MAP_SPLICE_STATS,
    MAP_LOCAL_PODS,
    MAP_PAIR_POLICY,
    MAP_FAST_STATS,
];

/// The layout version of each map: its key and value types, its kind and
/// its size. Bump a map's version with any change to these: a new daemon
/// then builds the map beside the old one (pinned as `<NAME>_v<N>`), fills
/// it, and switches the programs over to it in one step (`BPF_LINK_UPDATE`)
/// before removing the old one. Maps whose version did not change are
/// shared by the old programs and the new ones.
pub const MAP_LAYOUTS: &[(&str, u32)] = &[
    // 2: a random service's slots inline (`lb::INLINE_SLOTS`).
    (MAP_SERVICES, 2),
    // 2: 131,072 entries, was 262,144.
    (MAP_BACKENDS, 2),
    // 2: a hash of maps, one array per service generation (was one hash
    // entry per slot, whose buckets cost 16 bytes per possible entry).
    (MAP_SLOTS, 2),
    (MAP_MAGLEV, 2),
    // 2: a hash allocated on insert, swept by the daemon (was an LRU).
    (MAP_AFFINITY, 2),
    // 2: 65,536 entries (UDP only), was 262,144.
    (MAP_REVNAT, 2),
    // 2: also holds a captured socket's destination (was LW_ORIG_DST).
    (MAP_SOCK_REVNAT, 2),
    // 2: allocated on insert (BPF_F_NO_PREALLOC).
    (MAP_SVC_STATS, 2),
    (MAP_SVC_CIDRS, 1),
    (MAP_MESHED_NETNS, 1),
    // 2: 16,384 entries (connections in flight to the daemon), was 65,536.
    (MAP_CAPTURED, 2),
    (MAP_INBOUND, 1),
    (MAP_NODE_ADDRS, 1),
    (MAP_SPLICE, 1),
    (MAP_SPLICE_TO, 1),
    // 2: a hash allocated on insert, marks deleted as senders close (was an LRU).
    (MAP_SPLICE_OFF, 2),
    (MAP_SETTINGS, 1),
    (MAP_SPLICE_STATS, 1),
    // 2: allocated on insert (BPF_F_NO_PREALLOC).
    (MAP_LOCAL_PODS, 2),
    // 2: 131,072 entries, was 262,144.
    (MAP_PAIR_POLICY, 2),
    (MAP_FAST_STATS, 1),
];

/// Maps earlier versions pinned and this one no longer has: a daemon that
/// takes over from such a version removes their pins once its programs are
/// switched over, as it does for other layout versions.
pub const RETIRED_MAPS: &[&str] = &[
    // Per-port connect counts, written on every connect for a listing;
    // `lacewing maps conns` now reads the per-service counters.
    "LW_CONN_BY_PORT",
    // A captured socket's destination, by cookie, until established; now
    // in the socket's storage (`MAP_SOCK_REVNAT`).
    "LW_ORIG_DST",
];

/// The maps the node fills from its configuration alone (the service load
/// balancer's): the ones a test build moves to a new layout version to
/// exercise an upgrade across a layout change.
pub const SERVICE_MAPS: &[&str] = &[MAP_SERVICES, MAP_BACKENDS, MAP_SLOTS, MAP_SVC_CIDRS];

/// A cgroup `sock_addr` program: its name and its attach point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockAddrProgram {
    pub name: &'static str,
    pub attach: SockAddrAttach,
}

/// Attach points of cgroup `sock_addr` programs we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockAddrAttach {
    Connect4,
    Connect6,
    SendMsg4,
    SendMsg6,
    RecvMsg4,
    RecvMsg6,
    GetPeerName4,
    GetPeerName6,
}

/// Every cgroup `sock_addr` program, attached at the node's cgroup.
pub const SOCK_ADDR_PROGRAMS: &[SockAddrProgram] = &[
    SockAddrProgram {
        name: "lw_connect4",
        attach: SockAddrAttach::Connect4,
    },
    SockAddrProgram {
        name: "lw_connect6",
        attach: SockAddrAttach::Connect6,
    },
    SockAddrProgram {
        name: "lw_sendmsg4",
        attach: SockAddrAttach::SendMsg4,
    },
    SockAddrProgram {
        name: "lw_sendmsg6",
        attach: SockAddrAttach::SendMsg6,
    },
    SockAddrProgram {
        name: "lw_recvmsg4",
        attach: SockAddrAttach::RecvMsg4,
    },
    SockAddrProgram {
        name: "lw_recvmsg6",
        attach: SockAddrAttach::RecvMsg6,
    },
    SockAddrProgram {
        name: "lw_getpeername4",
        attach: SockAddrAttach::GetPeerName4,
    },
    SockAddrProgram {
        name: "lw_getpeername6",
        attach: SockAddrAttach::GetPeerName6,
    },
];

/// Longest object name the kernel keeps.
pub const MAX_OBJ_NAME_LEN: usize = 15;

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(ALL_MAPS[i].len() <= MAX_OBJ_NAME_LEN);
        i += 1;
    }
    let mut i = 0;
    while i < SOCK_ADDR_PROGRAMS.len() {
        assert!(SOCK_ADDR_PROGRAMS[i].name.len() <= MAX_OBJ_NAME_LEN);
        i += 1;
    }
};
