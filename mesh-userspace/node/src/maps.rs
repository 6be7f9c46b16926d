//! Typed wrappers over the pinned maps. This module owns every raw map call;
//! the rest of the crate reads and writes maps through these types.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Pod,
    maps::{
        Array, HashMap, HashOfMaps, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
};
use mesh_common::{
    lb::{
        Affinity, AffinityKey, Backend, CIDR_KEY_HEADER_BITS, CidrKey, Service, Slot, SvcCidr,
        SvcKey, SvcStats, TableKey,
    },
    names,
    splice::{self, Settings, SpliceKey},
};

/// The key of an address in `LW_NODE_ADDRS`, `LW_INBOUND`, `LW_LOCAL_PODS`.
pub fn addr_key(ip: std::net::IpAddr) -> mesh_common::capture::AddrKey {
    let (addr, family) = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, mesh_common::family::INET as u8)
        }
        std::net::IpAddr::V6(v6) => (v6.octets(), mesh_common::family::INET6 as u8),
    };
    mesh_common::capture::AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// Where maps are pinned below a bpffs root.
pub fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}

/// How far this daemon moves the service maps' layout versions beyond the
/// built-in ones: 0, except in a test of an upgrade across a layout change
/// (`--layout-bump`).
static LAYOUT_BUMP: AtomicU32 = AtomicU32::new(0);

/// Sets the test switch [`LAYOUT_BUMP`]; once, at start.
pub fn set_layout_bump(bump: u32) {
    LAYOUT_BUMP.store(bump, Ordering::Relaxed);
}

/// The layout version of map `name` this daemon uses.
pub fn layout_version(name: &str) -> u32 {
    let built_in = names::MAP_LAYOUTS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(1, |(_, v)| *v);
    if names::SERVICE_MAPS.contains(&name) {
        built_in + LAYOUT_BUMP.load(Ordering::Relaxed)
    } else {
        built_in
    }
}

/// The daemon's layout as one number (the sum of its maps' versions),
/// which two daemons compare in a handoff.
pub fn layout() -> u32 {
    names::ALL_MAPS.iter().map(|n| layout_version(n)).sum()
}

/// The pin name of map `name` at layout `version`: the name alone for
/// version 1, `<NAME>_v<N>` after (as Cilium names its maps).
pub fn pin_name(name: &str, version: u32) -> String {
    if version <= 1 {
        name.to_owned()
    } else {
        format!("{name}_v{version}")
    }
}

/// Where map `name` is pinned below a bpffs root, at this daemon's layout.
pub fn pin_path(root: &Path, name: &str) -> PathBuf {
    maps_dir(root).join(pin_name(name, layout_version(name)))
}

/// Pins of other layout versions of our maps, and of maps we no longer
/// have, below `root`: a previous daemon's, still in use by the programs
/// attached now until they are switched over.
pub fn other_layouts(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(maps_dir(root)) else {
        return Vec::new();
    };
    let ours: Vec<String> = names::ALL_MAPS
        .iter()
        .map(|n| pin_name(n, layout_version(n)))
        .collect();
    entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|file| {
            !ours.contains(file)
                && names::ALL_MAPS
                    .iter()
                    .chain(names::RETIRED_MAPS)
                    .any(|n| is_pin_of(file, n))
        })
        .map(|file| maps_dir(root).join(file))
        .collect()
}

/// Whether pin file name `file` is map `name` at some layout version.
fn is_pin_of(file: &str, name: &str) -> bool {
    file == name
        || file
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix("_v"))
            .is_some_and(|v| v.parse::<u32>().is_ok())
}

/// Copies the switched-off marks of an older layout's `LW_SPLICE_OFF`
/// (among `old_pins`) into ours. The sk_msg program this daemon attaches
/// reads only ours, and a sender that once wrote the usual way must never
/// be moved again (its bytes would arrive out of order); the loader runs
/// this before attaching it and again after (the old program may mark a
/// sender in between). How many marks were copied.
pub fn carry_splice_off(root: &Path, old_pins: &[PathBuf]) -> Result<usize, MapError> {
    let mut ours: HashMap<MapData, SpliceKey, u8> =
        HashMap::try_from(open(root, names::MAP_SPLICE_OFF)?)?;
    let mut copied = 0;
    for old in old_pins.iter().filter(|p| {
        p.file_name()
            .is_some_and(|f| is_pin_of(&f.to_string_lossy(), names::MAP_SPLICE_OFF))
    }) {
        let theirs: HashMap<MapData, SpliceKey, u8> =
            HashMap::try_from(Map::from_map_data(MapData::from_pin(old)?)?)?;
        for key in theirs.keys() {
            ours.insert(key?, 1, 0)?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Opens pinned map `name`.
pub fn open(root: &Path, name: &str) -> Result<Map, MapError> {
    Map::from_map_data(MapData::from_pin(pin_path(root, name))?)
}

/// A map call that failed, naming the map and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map}: {source}")]
pub struct MapOpError {
    pub map: &'static str,
    pub op: &'static str,
    /// Boxed: aya's error is large and this travels up through every apply.
    #[source]
    pub source: Box<MapError>,
}

fn ctx(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapOpError {
    move |source| MapOpError {
        map,
        op,
        source: Box::new(source),
    }
}

/// Which slot map a service's algorithm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotTable {
    /// In the service's own entry (`Service.slots`): a random service of at
    /// most `INLINE_SLOTS` slots.
    Inline,
    /// `LW_SLOTS`: weighted random, more slots than fit inline.
    Weighted,
    /// `LW_MAGLEV`: Maglev lookup table.
    Maglev,
}

/// `BPF_F_INNER_MAP`: the flag of the slot arrays (and of the inner map
/// template the kernel object declares), so arrays of any size fit the
/// same outer map.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// An outer slot map: a table (array of slots) per service generation.
type SlotMaps = HashOfMaps<MapData, TableKey, Array<MapData, Slot>>;

/// The service load balancer's maps of one node.
pub struct LbMaps {
    services: HashMap<MapData, SvcKey, Service>,
    backends: HashMap<MapData, u32, Backend>,
    slots: SlotMaps,
    maglev: SlotMaps,
    stats: PerCpuHashMap<MapData, u32, SvcStats>,
    cidrs: LpmTrie<MapData, CidrKey, SvcCidr>,
    affinity: HashMap<MapData, AffinityKey, Affinity>,
}

impl LbMaps {
    /// Opens the pinned maps of the daemon whose bpffs root is `root`.
    pub fn open(root: &Path) -> Result<Self, MapError> {
        Ok(Self {
            services: HashMap::try_from(open(root, names::MAP_SERVICES)?)?,
            backends: HashMap::try_from(open(root, names::MAP_BACKENDS)?)?,
            slots: HashOfMaps::try_from(open(root, names::MAP_SLOTS)?)?,
            maglev: HashOfMaps::try_from(open(root, names::MAP_MAGLEV)?)?,
            stats: PerCpuHashMap::try_from(open(root, names::MAP_SVC_STATS)?)?,
            cidrs: LpmTrie::try_from(open(root, names::MAP_SVC_CIDRS)?)?,
            affinity: HashMap::try_from(open(root, names::MAP_AFFINITY)?)?,
        })
    }

    /// Deletes the affinity entries `expired` says are past use (given the
    /// service id and the entry); how many went.
    pub fn sweep_affinity(
        &mut self,
        expired: impl Fn(u32, &Affinity) -> bool,
    ) -> Result<usize, MapOpError> {
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| expired(k.svc_id, v))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            ignore_missing(self.affinity.remove(k))
                .map_err(ctx(names::MAP_AFFINITY, "deleting"))?;
        }
        Ok(stale.len())
    }

    pub fn services(&self) -> Result<Vec<(SvcKey, Service)>, MapOpError> {
        collect(&self.services).map_err(ctx(names::MAP_SERVICES, "reading"))
    }

    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, MapOpError> {
        collect(&self.backends).map_err(ctx(names::MAP_BACKENDS, "reading"))
    }

    /// Every table in a slot map (for cleaning orphans after a crash).
    pub fn slot_keys(&self, table: SlotTable) -> Result<Vec<TableKey>, MapOpError> {
        let Some((map, name)) = self.table(table) else {
            return Ok(Vec::new());
        };
        map.keys()
            .collect::<Result<_, _>>()
            .map_err(ctx(name, "reading"))
    }

    /// Replaces a service entry whole: the kernel swaps the element, so a
    /// reader sees the old value or the new one, never a mix.
    pub fn put_service(&mut self, key: &SvcKey, value: &Service) -> Result<(), MapOpError> {
        self.services
            .insert(key, value, 0)
            .map_err(ctx(names::MAP_SERVICES, "writing"))
    }

    pub fn delete_service(&mut self, key: &SvcKey) -> Result<(), MapOpError> {
        ignore_missing(self.services.remove(key)).map_err(ctx(names::MAP_SERVICES, "deleting"))
    }

    pub fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapOpError> {
        self.backends
            .insert(id, value, 0)
            .map_err(ctx(names::MAP_BACKENDS, "writing"))
    }

    pub fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        ignore_missing(self.backends.remove(&id)).map_err(ctx(names::MAP_BACKENDS, "deleting"))
    }

    /// Writes one service generation's slot table: a new array exactly
    /// `backend_ids.len()` long, filled, then put in the outer map, so a
    /// reader that finds the table finds it whole. Inline slots live in the
    /// service entry and have nothing to write here.
    pub fn put_slots(
        &mut self,
        table: SlotTable,
        svc_id: u32,
        generation: u32,
        backend_ids: &[u32],
    ) -> Result<(), MapOpError> {
        let (name, map) = match table {
            SlotTable::Inline => return Ok(()),
            SlotTable::Weighted => (names::MAP_SLOTS, &mut self.slots),
            SlotTable::Maglev => (names::MAP_MAGLEV, &mut self.maglev),
        };
        if backend_ids.is_empty() {
            // No ready backend (count 0): the kernel refuses the connect
            // before it looks for a table, and an array cannot be empty.
            return Ok(());
        }
        let len = u32::try_from(backend_ids.len()).unwrap_or(u32::MAX);
        let data = MapData::create(
            aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
                size_of::<u32>() as u32,
                size_of::<Slot>() as u32,
                len,
                BPF_F_INNER_MAP,
            ),
            // bpftool shows each table under its outer map's name.
            name,
            None,
        )
        .map_err(ctx(name, "creating a table for"))?;
        let mut array: Array<MapData, Slot> =
            Array::try_from(Map::Array(data)).map_err(ctx(name, "creating a table for"))?;
        for (index, &backend_id) in backend_ids.iter().enumerate() {
            array
                .set(index as u32, Slot { backend_id }, 0)
                .map_err(ctx(name, "writing"))?;
        }
        map.insert(TableKey { svc_id, generation }, &array, 0)
            .map_err(ctx(name, "writing"))
    }

    /// Deletes one service generation's slot table (the kernel frees the
    /// array once no program holds it).
    pub fn delete_slots(
        &mut self,
        table: SlotTable,
        svc_id: u32,
        generation: u32,
    ) -> Result<(), MapOpError> {
        self.delete_slot_key(table, &TableKey { svc_id, generation })
    }

    pub fn delete_slot_key(&mut self, table: SlotTable, key: &TableKey) -> Result<(), MapOpError> {
        let (name, map) = match table {
            SlotTable::Inline => return Ok(()),
            SlotTable::Weighted => (names::MAP_SLOTS, &mut self.slots),
            SlotTable::Maglev => (names::MAP_MAGLEV, &mut self.maglev),
        };
        ignore_missing(map.remove(key)).map_err(ctx(name, "deleting"))
    }

    /// Counters of one service, summed over CPUs (zero if it has none yet).
    pub fn stats(&self, svc_id: u32) -> Result<SvcStats, MapOpError> {
        match self.stats.get(&svc_id, 0) {
            Ok(per_cpu) => Ok(per_cpu.iter().fold(SvcStats::default(), |acc, s| SvcStats {
                connects: acc.connects + s.connects,
                refused: acc.refused + s.refused,
            })),
            Err(MapError::KeyNotFound) => Ok(SvcStats::default()),
            Err(source) => Err(MapOpError {
                map: names::MAP_SVC_STATS,
                op: "reading",
                source: Box::new(source),
            }),
        }
    }

    pub fn delete_stats(&mut self, svc_id: u32) -> Result<(), MapOpError> {
        ignore_missing(self.stats.remove(&svc_id)).map_err(ctx(names::MAP_SVC_STATS, "deleting"))
    }

    /// Makes the service CIDR map hold exactly `cidrs` (family, address,
    /// prefix length): new entries first, then stale ones go.
    pub fn set_service_cidrs(&mut self, cidrs: &[(u8, [u8; 16], u8)]) -> Result<(), MapOpError> {
        let key = |&(family, addr, prefix): &(u8, [u8; 16], u8)| {
            Key::new(
                CIDR_KEY_HEADER_BITS + u32::from(prefix),
                CidrKey {
                    family,
                    _pad: [0; 3],
                    addr,
                },
            )
        };
        for c in cidrs {
            self.cidrs
                .insert(&key(c), SvcCidr::default(), 0)
                .map_err(ctx(names::MAP_SVC_CIDRS, "writing"))?;
        }
        let wanted: Vec<(u32, CidrKey)> = cidrs
            .iter()
            .map(|c| {
                let k = key(c);
                (k.prefix_len(), k.data())
            })
            .collect();
        let stale: Vec<Key<CidrKey>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            ignore_missing(self.cidrs.remove(&k)).map_err(ctx(names::MAP_SVC_CIDRS, "deleting"))?;
        }
        Ok(())
    }

    fn table(&self, table: SlotTable) -> Option<(&SlotMaps, &'static str)> {
        match table {
            SlotTable::Inline => None,
            SlotTable::Weighted => Some((&self.slots, names::MAP_SLOTS)),
            SlotTable::Maglev => Some((&self.maglev, names::MAP_MAGLEV)),
        }
    }
}

fn collect<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>, MapError> {
    map.iter().collect()
}

/// Deleting what is already gone is success: deletes are idempotent.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The node's acceleration switch, and what the splice programs did.
pub struct SpliceMaps {
    settings: Array<MapData, Settings>,
    stats: PerCpuArray<MapData, u64>,
    fast_stats: PerCpuArray<MapData, u64>,
    sockets: SockHash<MapData, SpliceKey>,
    daemon_sockets: SockHash<MapData, SpliceKey>,
}

impl SpliceMaps {
    /// Opens the pinned maps of the daemon whose bpffs root is `root`.
    pub fn open(root: &Path) -> Result<Self, MapError> {
        Ok(Self {
            settings: Array::try_from(open(root, names::MAP_SETTINGS)?)?,
            stats: PerCpuArray::try_from(open(root, names::MAP_SPLICE_STATS)?)?,
            fast_stats: PerCpuArray::try_from(open(root, names::MAP_FAST_STATS)?)?,
            sockets: SockHash::try_from(open(root, names::MAP_SPLICE)?)?,
            daemon_sockets: SockHash::try_from(open(root, names::MAP_SPLICE_TO)?)?,
        })
    }

    /// Turns acceleration on or off for connections established from now
    /// on; sockets already spliced go on reading what was moved to them.
    pub fn set_acceleration(&mut self, on: bool) -> Result<(), MapOpError> {
        self.set_flag(splice::ACCELERATION, on)
    }

    /// Turns the kernel fast path on or off for connects from now on
    /// (it also needs acceleration on).
    pub fn set_fast_path(&mut self, on: bool) -> Result<(), MapOpError> {
        self.set_flag(splice::FAST_PATH, on)
    }

    fn set_flag(&mut self, flag: u32, on: bool) -> Result<(), MapOpError> {
        let mut settings = self.settings().unwrap_or_default();
        if on {
            settings.flags |= flag;
        } else {
            settings.flags &= !flag;
        }
        self.settings
            .set(splice::SETTINGS_INDEX, settings, 0)
            .map_err(ctx(names::MAP_SETTINGS, "update"))
    }

    pub fn acceleration(&self) -> Result<bool, MapOpError> {
        Ok(self.settings()?.flags & splice::ACCELERATION != 0)
    }

    /// Whether the fast path is switched on (it works only with
    /// acceleration on too).
    pub fn fast_path(&self) -> Result<bool, MapOpError> {
        Ok(self.settings()?.flags & splice::FAST_PATH != 0)
    }

    /// The connect hook's fast-path decisions: (path, reason, count).
    pub fn decisions(&self) -> Result<Vec<(&'static str, &'static str, u64)>, MapOpError> {
        mesh_common::fastpath::STAT_NAMES
            .iter()
            .map(|&(index, path, reason)| {
                let per_cpu = self
                    .fast_stats
                    .get(&index, 0)
                    .map_err(ctx(names::MAP_FAST_STATS, "lookup"))?;
                Ok((path, reason, per_cpu.iter().sum()))
            })
            .collect()
    }

    fn settings(&self) -> Result<Settings, MapOpError> {
        self.settings
            .get(&splice::SETTINGS_INDEX, 0)
            .map_err(ctx(names::MAP_SETTINGS, "lookup"))
    }

    /// Sockets added to the sockhash, by leg name, summed over CPUs.
    pub fn added(&self) -> Result<Vec<(&'static str, u64)>, MapOpError> {
        splice::STAT_NAMES
            .iter()
            .map(|&(index, leg)| {
                let per_cpu = self
                    .stats
                    .get(&index, 0)
                    .map_err(ctx(names::MAP_SPLICE_STATS, "lookup"))?;
                Ok((leg, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Sockets in the two sockhashes now (apps' and pods' ends, the
    /// daemon's ends).
    pub fn sockets(&self) -> usize {
        self.sockets.keys().filter(Result::is_ok).count()
            + self.daemon_sockets.keys().filter(Result::is_ok).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_of_other_layouts_and_of_retired_maps_are_the_previous_daemons() {
        let root = std::env::temp_dir().join(format!("lw-maps-test-{}", std::process::id()));
        let dir = maps_dir(&root);
        std::fs::create_dir_all(&dir).unwrap();
        let ours = [
            pin_name(names::MAP_SERVICES, layout_version(names::MAP_SERVICES)),
            pin_name(names::MAP_REVNAT, layout_version(names::MAP_REVNAT)),
        ];
        let previous = [
            "LW_CONN_BY_PORT",
            "LW_ORIG_DST",
            "LW_REVNAT",
            "LW_SERVICES_v7",
        ];
        for file in ours
            .iter()
            .map(String::as_str)
            .chain(previous)
            .chain(["LW_OTHER_v2", "notes"])
        {
            std::fs::write(dir.join(file), "").unwrap();
        }
        let mut found: Vec<String> = other_layouts(&root)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        found.sort();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, previous);
    }
}
