//! The record a lab keeps on disk, so `lacewing lab status/exec/down` can find a
//! lab made by another process, and the sweep can tell orphans from live labs.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::topology::{LabId, Topology};

/// Where lab records live (tmpfs: gone after a reboot, as the labs are).
pub const STATE_ROOT: &str = "/run/lacewing/labs";

/// A lab's record, `/run/lacewing/labs/lw-<id>/lab.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub topology: Topology,
    /// The process that owns the lab and removes it when done; `None` for a lab
    /// left running on purpose (`lacewing lab up`), removed by `lab down`.
    pub owner_pid: Option<u32>,
    /// Where cgroup v2 was mounted when the lab was made.
    pub cgroup2: PathBuf,
}

/// The lab's own folder for its record, configs and logs.
pub fn dir(id: LabId) -> PathBuf {
    Path::new(STATE_ROOT).join(id.prefix())
}

pub fn write(record: &Record) -> io::Result<()> {
    let dir = dir(record.topology.id);
    let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    if dir.is_dir() {
        // Written whole then renamed, so a reader never sees half a record.
        let tmp = dir.join("lab.json.tmp");
        fs::write(&tmp, json)?;
        return fs::rename(tmp, dir.join("lab.json"));
    }
    // A new lab's folder appears with its record already in it: the sweep
    // takes a lab folder without a record for an orphan, and must never see
    // one that is only being made.
    let staging = Path::new(STATE_ROOT).join(format!(".new-{}", record.topology.id));
    fs::create_dir_all(&staging)?;
    fs::write(staging.join("lab.json"), json)?;
    fs::rename(&staging, &dir)
}

pub fn read(id: LabId) -> io::Result<Record> {
    let bytes = fs::read(dir(id).join("lab.json"))?;
    serde_json::from_slice(&bytes).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
}
