//! `lacewing-node` settings: flags with environment fallbacks, then validation
//! with an error that says what to fix.

use std::path::PathBuf;

use clap::Parser;

use crate::{bpffs, cgroup, telemetry::LogFormat};

/// Environment names, as in the DaemonSet manifest.
pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_CGROUP_ROOT: &str = "LACEWING_CGROUP_ROOT";
pub const ENV_BPFFS_ROOT: &str = "LACEWING_BPFFS_ROOT";

/// Command-line flags of `lacewing-node`.
#[derive(Debug, Parser)]
#[command(name = "lacewing-node", version, about = "Lacewing's per-node daemon")]
pub struct NodeArgs {
    /// This node's name (the DaemonSet passes spec.nodeName). Default: hostname.
    #[arg(long, env = ENV_NODE_NAME)]
    pub node_name: Option<String>,
    /// cgroup v2 directory to attach the programs at. Default: the cgroup v2
    /// root, read from /proc/self/mountinfo, as on a real node.
    #[arg(long, env = ENV_CGROUP_ROOT)]
    pub cgroup_root: Option<PathBuf>,
    /// Folder on bpffs where maps and links are pinned.
    #[arg(long, env = ENV_BPFFS_ROOT, default_value_os_t = bpffs::default_root())]
    pub bpffs_root: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_name: String,
    pub cgroup_root: PathBuf,
    pub bpffs_root: PathBuf,
}

/// A setting that cannot be used, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no cgroup v2 filesystem is mounted; mount one or pass --cgroup-root")]
    NoCgroup2,
    #[error("--cgroup-root {0} is not a cgroup v2 directory (it has no cgroup.procs)")]
    NotACgroup(PathBuf),
    #[error("--bpffs-root {0} is not below the bpffs mount {mount}", mount = bpffs::MOUNT_POINT)]
    NotOnBpffs(PathBuf),
    #[error("cannot tell the node name: pass --node-name or set {ENV_NODE_NAME}")]
    NoNodeName,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl NodeArgs {
    pub fn validate(self) -> Result<NodeConfig, ConfigError> {
        let cgroup_root = match self.cgroup_root {
            Some(path) => path,
            None => cgroup::cgroup2_mount()?.ok_or(ConfigError::NoCgroup2)?,
        };
        if !cgroup_root.join("cgroup.procs").is_file() {
            return Err(ConfigError::NotACgroup(cgroup_root));
        }
        if !self.bpffs_root.starts_with(bpffs::MOUNT_POINT) {
            return Err(ConfigError::NotOnBpffs(self.bpffs_root));
        }
        let node_name = match self.node_name {
            Some(name) if !name.is_empty() => name,
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .ok_or(ConfigError::NoNodeName)?,
        };
        Ok(NodeConfig {
            node_name,
            cgroup_root,
            bpffs_root: self.bpffs_root,
        })
    }
}
