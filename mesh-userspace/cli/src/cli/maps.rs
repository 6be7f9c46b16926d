//! `lacewing maps ...`: what a node's kernel programs recorded.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use lacewing_node::{
    lb::LoadBalancer,
    maps::{LbMaps, SpliceMaps},
};
use lacewing_sys::bpffs;

#[derive(Debug, Subcommand)]
pub enum MapsCommand {
    /// Connects counted per service frontend (and refused ones, also to
    /// addresses in the service CIDRs that are no service).
    Conns {
        /// The node daemon's bpffs root.
        #[arg(long, default_value_os_t = bpffs::default_root())]
        bpffs_root: PathBuf,
    },
    /// Service frontends, their backends and counters, as the kernel has them.
    Services {
        /// The node daemon's bpffs root.
        #[arg(long, default_value_os_t = bpffs::default_root())]
        bpffs_root: PathBuf,
    },
}

pub fn run(cmd: MapsCommand) -> anyhow::Result<()> {
    match cmd {
        MapsCommand::Conns { bpffs_root } => {
            print!("{}", conn_table(&bpffs_root)?);
            Ok(())
        }
        MapsCommand::Services { bpffs_root } => {
            print!("{}", services_table(&bpffs_root)?);
            Ok(())
        }
    }
}

/// A switch position on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Sets the acceleration switch of the daemon at `root` (when `to` is
/// given) and reports it with the sockhash's size and counters.
pub fn acceleration(
    root: &Path,
    to: Option<Switch>,
    fast_path: Option<Switch>,
) -> anyhow::Result<String> {
    let mut maps = SpliceMaps::open(root).map_err(|err| {
        anyhow::anyhow!(
            "opening the splice maps under {}: {err} (is lacewing-node running there?)",
            root.display()
        )
    })?;
    if let Some(to) = to {
        maps.set_acceleration(to == Switch::On)?;
    }
    if let Some(to) = fast_path {
        maps.set_fast_path(to == Switch::On)?;
    }
    let word = |on: bool| if on { "on" } else { "off" };
    let mut out = format!(
        "acceleration: {}\nfast path: {}\nspliced sockets now: {}\n",
        word(maps.acceleration()?),
        word(maps.fast_path()?),
        maps.sockets()
    );
    for (leg, n) in maps.added()? {
        out.push_str(&format!("sockets added ({leg}): {n}\n"));
    }
    for (path, reason, n) in maps.decisions()? {
        out.push_str(&format!("connects to the {path} ({reason}): {n}\n"));
    }
    Ok(out)
}

/// The connect counters of the daemon at `root` as a table, one row per
/// service frontend. The kernel counts a connect where it looks the
/// destination up as a service (one per-CPU counter per service, no
/// write for other connects), so this is what it has.
pub fn conn_table(root: &Path) -> anyhow::Result<String> {
    let maps = open_lb_maps(root)?;
    let unallocated = maps.stats(mesh_common::lb::UNALLOCATED_SVC_ID)?.refused;
    let lb = LoadBalancer::inspect(maps)?;
    let mut out = format!(
        "{:<40} {:<5} {:>10} {:>8}\n",
        "FRONTEND", "PROTO", "CONNECTS", "REFUSED"
    );
    for s in lb.describe()? {
        out.push_str(&format!(
            "{:<40} {:<5} {:>10} {:>8}\n",
            s.frontend.to_string(),
            s.protocol.to_string(),
            s.stats.connects,
            s.stats.refused
        ));
    }
    out.push_str(&format!(
        "refused, no service at the address (in the service CIDRs): {unallocated}\n"
    ));
    Ok(out)
}

fn open_lb_maps(root: &Path) -> anyhow::Result<LbMaps> {
    LbMaps::open(root).map_err(|err| {
        anyhow::anyhow!(
            "opening the service maps under {}: {err} (is lacewing-node running there?)",
            root.display()
        )
    })
}

/// The services of the daemon at `root` as a table, read from its pinned maps.
pub fn services_table(root: &Path) -> anyhow::Result<String> {
    let lb = LoadBalancer::inspect(open_lb_maps(root)?)?;
    let mut out = format!(
        "{:<24} {:<5} {:<8} {:>8} {:>10} {:>8}  BACKENDS\n",
        "FRONTEND", "PROTO", "ALGO", "AFFINITY", "CONNECTS", "REFUSED"
    );
    for s in lb.describe()? {
        out.push_str(&format!(
            "{:<24} {:<5} {:<8} {:>8} {:>10} {:>8}  {}\n",
            s.frontend.to_string(),
            s.protocol.to_string(),
            s.algorithm,
            if s.affinity_timeout_s == 0 {
                "-".to_owned()
            } else {
                format!("{}s", s.affinity_timeout_s)
            },
            s.stats.connects,
            s.stats.refused,
            if s.backends.is_empty() {
                "(none: refused)".to_owned()
            } else {
                s.backends.join(" ")
            }
        ));
    }
    Ok(out)
}
