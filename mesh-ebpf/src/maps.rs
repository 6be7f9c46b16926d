//! Every map the kernel programs use, declared once.
//!
//! BTF-defined (`#[btf_map]`) so `bpftool map dump` prints keys and values with
//! their field names. Static names match `mesh_common::names`. Sizes here are
//! defaults; `lacewing-node` can resize maps at load time.

use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_NO_PREALLOC},
    btf_maps::{
        Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage,
        SockHash, lpm_trie::Key,
    },
    macros::btf_map,
};
use mesh_common::{
    capture::{AddrKey, CapturedKey, MeshedNetns, OrigDst},
    fastpath::{self, LocalPod, PairKey},
    lb::{
        Affinity, AffinityKey, Backend, CidrKey, RevNat, RevNatKey, Service, Slot, SockRevNat,
        SvcCidr, SvcKey, SvcStats, TableKey,
    },
    splice::{STATS, Settings, SpliceKey},
};

/// Maps that may hold many entries allocate them on insert, so memory follows
/// what is configured rather than the maximum.
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// `names::MAP_SERVICES`: service frontends. Updated whole (hash map update
/// replaces the element), which is what makes a generation switch atomic.
#[btf_map]
pub static LW_SERVICES: HashMap<SvcKey, Service, 65536, NO_PREALLOC> = HashMap::new();

/// `names::MAP_BACKENDS`: backends by id. 131,072: twice Cilium's default
/// (65,536), 10,000 services of 10 backends with room; each possible entry
/// costs 16 bytes of buckets, used or not.
#[btf_map]
pub static LW_BACKENDS: HashMap<u32, Backend, 131072, NO_PREALLOC> = HashMap::new();

/// A service generation's slot table: an array sized to the table. Flagged
/// `BPF_F_INNER_MAP` so arrays of any size fit one outer map (the kernel
/// then checks sizes per lookup instead of at insert); the maps userspace
/// creates carry the same flag.
pub type SlotArray = Array<Slot, 1, { BPF_F_INNER_MAP as usize }>;

/// `names::MAP_SLOTS`: slot tables of random-algorithm services with more
/// than `INLINE_SLOTS` slots (the others keep theirs in `LW_SERVICES`).
/// One outer entry per table, each table exactly its size: memory follows
/// what is configured (Cilium keeps its Maglev tables the same way).
#[btf_map]
pub static LW_SLOTS: HashOfMaps<TableKey, SlotArray, 65536, NO_PREALLOC> = HashOfMaps::new();

/// `names::MAP_MAGLEV`: Maglev tables, as `LW_SLOTS`.
#[btf_map]
pub static LW_MAGLEV: HashOfMaps<TableKey, SlotArray, 16384, NO_PREALLOC> = HashOfMaps::new();

/// `names::MAP_AFFINITY`: ClientIP session affinity. Allocated on insert:
/// only services with affinity write here, and the daemon deletes entries
/// past their service's timeout (`LoadBalancer::sweep_affinity`); a full
/// map records no new affinity until then (the client is balanced as
/// without it). An LRU would preallocate all 65,536 entries (6.3 MB).
#[btf_map]
pub static LW_AFFINITY: HashMap<AffinityKey, Affinity, 65536, NO_PREALLOC> = HashMap::new();

/// `names::MAP_REVNAT`: the service address behind a UDP socket's backend
/// (replies come from the backend per datagram). TCP sockets keep theirs
/// in `LW_SOCK_REVNAT`, so this holds UDP flows only (Cilium's default
/// reverse-NAT size).
#[btf_map]
pub static LW_REVNAT: LruHashMap<RevNatKey, RevNat, 65536> = LruHashMap::new();

/// `names::MAP_SOCK_REVNAT`: a TCP socket's translation (and a captured
/// socket's destination), in the socket's own storage: no entry per
/// connection to age out, and getpeername of a socket never translated
/// finds nothing at once.
#[btf_map]
pub static LW_SOCK_REVNAT: SkStorage<SockRevNat> = SkStorage::new();

/// `names::MAP_SVC_STATS`: per-service counters, allocated as services
/// are first connected to (preallocated, 65,536 per-CPU slots cost 7 MB on
/// two CPUs whatever is configured).
#[btf_map]
pub static LW_SVC_STATS: PerCpuHashMap<u32, SvcStats, 65536, NO_PREALLOC> = PerCpuHashMap::new();

/// `names::MAP_SVC_CIDRS`: the cluster's service CIDRs.
#[btf_map]
pub static LW_SVC_CIDRS: LpmTrie<CidrKey, SvcCidr, 64> = LpmTrie::new();

/// The LPM key for one address (a full-length prefix).
#[inline(always)]
pub fn cidr_lookup_key(family: u8, addr: [u8; 16]) -> Key<CidrKey> {
    Key::new(
        mesh_common::lb::CIDR_KEY_HEADER_BITS + 128,
        CidrKey {
            family,
            _pad: [0; 3],
            addr,
        },
    )
}

/// `names::MAP_MESHED_NETNS`: meshed pods' network namespaces, by cookie.
#[btf_map]
pub static LW_MESHED_NETNS: HashMap<u64, MeshedNetns, 4096> = HashMap::new();

/// `names::MAP_CAPTURED`: a captured connection's destination, by (netns,
/// client port), for the daemon. It deletes each entry as it accepts the
/// connection, so this holds connections in flight between the handshake
/// and the daemon's accept: a few accept backlogs' worth, not every
/// connection open.
#[btf_map]
pub static LW_CAPTURED: LruHashMap<CapturedKey, OrigDst, 16384> = LruHashMap::new();

/// `names::MAP_INBOUND`: a STRICT pod's address to the daemon's plain-text
/// listener in that pod.
#[btf_map]
pub static LW_INBOUND: SockHash<AddrKey, 4096> = SockHash::new();

/// `names::MAP_NODE_ADDRS`: the node's addresses.
#[btf_map]
pub static LW_NODE_ADDRS: HashMap<AddrKey, u32, 256> = HashMap::new();

/// `names::MAP_SPLICE`: the app's or pod's end of local hops; `lw_sk_msg`
/// runs on their writes.
#[btf_map]
pub static LW_SPLICE: SockHash<SpliceKey, 65536> = SockHash::new();

/// `names::MAP_SPLICE_TO`: the daemon's end of local hops, where writes
/// are moved to.
#[btf_map]
pub static LW_SPLICE_TO: SockHash<SpliceKey, 65536> = SockHash::new();

/// `names::MAP_SPLICE_OFF`: senders whose writes go the usual way for the
/// rest of their life (they wrote the usual way once, or the daemon fell
/// behind them). Only senders in `LW_SPLICE` get a mark, and each mark is
/// deleted when its sender closes, so this never holds more than that map:
/// a plain hash allocated on insert, not an LRU that could evict a live
/// sender's mark (and move its writes again, out of order).
#[btf_map]
pub static LW_SPLICE_OFF: HashMap<SpliceKey, u8, 65536, NO_PREALLOC> = HashMap::new();

/// `names::MAP_SETTINGS`: the node's switches, written by the daemon.
#[btf_map]
pub static LW_SETTINGS: Array<Settings, 1> = Array::new();

/// `names::MAP_SPLICE_STATS`: sockets added to `LW_SPLICE`, by leg.
#[btf_map]
pub static LW_SPLICE_STATS: PerCpuArray<u64, { STATS as usize }> = PerCpuArray::new();

/// `names::MAP_LOCAL_PODS`: meshed pods on this node, by address.
#[btf_map]
pub static LW_LOCAL_PODS: HashMap<AddrKey, LocalPod, 16384, NO_PREALLOC> = HashMap::new();

/// `names::MAP_PAIR_POLICY`: fast-path verdicts (`fastpath::VERDICT_*`).
#[btf_map]
pub static LW_PAIR_POLICY: HashMap<PairKey, u32, 131072, NO_PREALLOC> = HashMap::new();

/// `names::MAP_FAST_STATS`: the connect hook's fast-path decisions.
#[btf_map]
pub static LW_FAST_STATS: PerCpuArray<u64, { fastpath::STATS as usize }> = PerCpuArray::new();
