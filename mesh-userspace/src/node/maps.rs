//! Typed wrappers over the pinned maps. This module owns every raw map call;
//! the rest of the crate reads and writes maps through these types.

use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError, PerCpuHashMap};
use mesh_common::{
    conn::{ConnCount, ConnKey},
    names,
};

/// Where maps are pinned below a bpffs root.
pub fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}

/// Where map `name` is pinned below a bpffs root.
pub fn pin_path(root: &Path, name: &str) -> PathBuf {
    maps_dir(root).join(name)
}

/// The per-port connection counters of one node.
pub struct ConnCounters {
    map: PerCpuHashMap<MapData, ConnKey, ConnCount>,
}

impl ConnCounters {
    /// Opens the pinned counter map of the daemon whose bpffs root is `root`.
    pub fn open(root: &Path) -> Result<Self, MapError> {
        let data = MapData::from_pin(pin_path(root, names::MAP_CONN_BY_PORT))?;
        let map = PerCpuHashMap::try_from(Map::from_map_data(data)?)?;
        Ok(Self { map })
    }

    /// Every key with its count summed over CPUs, ordered by key.
    pub fn snapshot(&self) -> Result<Vec<(ConnKey, u64)>, MapError> {
        let mut rows = Vec::new();
        for entry in self.map.iter() {
            let (key, per_cpu) = entry?;
            rows.push((key, per_cpu.iter().map(|c| c.connects).sum()));
        }
        rows.sort_by_key(|(key, _)| *key);
        Ok(rows)
    }
}
