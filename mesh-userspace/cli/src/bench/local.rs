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

use super::{
    on_path,
    tunnel::{Figures, Options, measure, pods_yaml, start_servers, wait_for_certificates},
};
use crate::lab::Lab;
use lacewing_node::maps::SpliceMaps;

/// Connections the daemon carried (through it, no fast path).
const CARRIED: &str = "lacewing_connections_opened_total";
/// Sockets of the capture leg spliced through sockmap.
const SPLICED_CAPTURE: &str = "lacewing_splice_sockets_added_total{leg=\"capture\"}";
/// Connects the kernel sent straight to the pod.
const KERNEL_ALLOWED: &str =
    "lacewing_fast_path_decisions_total{path=\"kernel\",reason=\"allowed\"}";

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
    // iperf3 and two sockperf runs a round: one connection each.
    let connections = f64::from(3 * opts.rounds);
    let no_mesh = on_path(&lab, "n0", CARRIED, 0.0, "no mesh", || {
        measure(&lab, &client, &server, opts, None)
    })?;
    std::fs::write(&file, pods_yaml(true, (&client, "n0"), (&server, "n0")))?;
    wait_for_certificates(&lab, &["n0"])?;
    let mut switches = SpliceMaps::open(&lab.node_bpffs_root(&lab.node("n0")?))?;
    // Each way, and the counter that shows it took that path.
    let mut way = |name: &str, acceleration: bool, fast_path: bool, counter: &str| {
        switches.set_acceleration(acceleration)?;
        switches.set_fast_path(fast_path)?;
        eprintln!("{name}");
        on_path(&lab, "n0", counter, connections, name, || {
            measure(&lab, &client, &server, opts, None)
        })
    };
    let off = way("mesh, acceleration off", false, false, CARRIED)?;
    let sockmap = way(
        "mesh, daemon hops spliced (sockmap)",
        true,
        false,
        SPLICED_CAPTURE,
    )?;
    let fast_path = way("mesh, kernel fast path", true, true, KERNEL_ALLOWED)?;
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
