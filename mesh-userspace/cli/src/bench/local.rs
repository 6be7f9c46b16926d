//! `lacewing bench local`: pod to pod on one node, one run, four ways: no
//! mesh (the namespace not enrolled); the mesh with acceleration off (both
//! hops through the daemon on plain TCP); with the daemon's hops spliced
//! through sockmap (fast path off); and the kernel fast path (straight from
//! pod to pod, decided at connect). iperf3 throughput and sockperf
//! request/reply latency on one connection each time, as in the tunnel
//! benchmark: the ratios use ping-pong (`pp`, one request in flight, p50);
//! under load (`ul`, 5,000/s) is printed too. The median of `rounds` runs
//! is kept.

use std::{path::Path, time::Duration};

use super::tunnel::{Figures, Options, measure, pods_yaml, start_servers, wait_for_certificates};
use crate::lab::Lab;
use lacewing_node::maps::SpliceMaps;

#[derive(Clone, Debug)]
pub struct Outcome {
    pub no_mesh: Figures,
    pub off: Figures,
    pub sockmap: Figures,
    pub fast_path: Figures,
}

pub fn run(bin_dir: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let lab = Lab::new(1, 2)?;
    let (client, server) = (lab.pod("n0-p0")?, lab.pod("n0-p1")?);
    let mesh = lab.start_mesh(bin_dir)?;
    let _servers = start_servers(&lab, &server)?;
    let file = mesh.folder.join("bench.yaml");
    std::fs::write(&file, pods_yaml(false, (&client, "n0"), (&server, "n0")))?;
    std::thread::sleep(Duration::from_secs(1));
    eprintln!("no mesh ({} s each, {} rounds)", opts.seconds, opts.rounds);
    let no_mesh = measure(&lab, &client, &server, opts, None)?;
    std::fs::write(&file, pods_yaml(true, (&client, "n0"), (&server, "n0")))?;
    wait_for_certificates(&lab, &["n0"])?;
    let mut switches = SpliceMaps::open(&lab.node_bpffs_root(&lab.node("n0")?))?;
    let mut way = |name: &str, acceleration: bool, fast_path: bool| {
        switches.set_acceleration(acceleration)?;
        switches.set_fast_path(fast_path)?;
        eprintln!("{name}");
        measure(&lab, &client, &server, opts, None)
    };
    let off = way("mesh, acceleration off", false, false)?;
    let sockmap = way("mesh, daemon hops spliced (sockmap)", true, false)?;
    let fast_path = way("mesh, kernel fast path", true, true)?;
    Ok(Outcome {
        no_mesh,
        off,
        sockmap,
        fast_path,
    })
}

pub fn result_line(o: &Outcome) -> String {
    format!(
        "RESULT local rr_p50_fastpath_vs_nomesh={:.2} rr_p50_sockmap_vs_off={:.2} tput_fastpath_vs_nomesh={:.2} tput_sockmap_vs_off={:.2}",
        o.fast_path.pp_p50_us / o.no_mesh.pp_p50_us,
        o.sockmap.pp_p50_us / o.off.pp_p50_us,
        o.fast_path.gbits / o.no_mesh.gbits,
        o.sockmap.gbits / o.off.gbits,
    )
}
