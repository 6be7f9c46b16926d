//! `lacewing maps ...`: what a node's kernel programs recorded.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use mesh_common::family;

use crate::{bpffs, node::maps::ConnCounters};

#[derive(Debug, Subcommand)]
pub enum MapsCommand {
    /// Connections counted per destination port.
    Conns {
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
    }
}

/// The connection counters of the daemon at `root` as a table.
pub fn conn_table(root: &Path) -> anyhow::Result<String> {
    let counters = ConnCounters::open(root).map_err(|err| {
        anyhow::anyhow!(
            "opening the counter map under {}: {err} (is lacewing-node running there?)",
            root.display()
        )
    })?;
    let mut out = format!(
        "{:<8} {:<6} {:<6} {:>10}\n",
        "PORT", "FAMILY", "PROTO", "CONNECTS"
    );
    for (key, connects) in counters.snapshot()? {
        let fam = match key.family {
            family::INET => "ipv4",
            family::INET6 => "ipv6",
            _ => "other",
        };
        let proto = match key.protocol {
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            p => p.to_string(),
        };
        out.push_str(&format!(
            "{:<8} {:<6} {:<6} {:>10}\n",
            key.dst_port, fam, proto, connects
        ));
    }
    Ok(out)
}
