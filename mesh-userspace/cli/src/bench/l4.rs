//! `bench l4`: short TCP connections to a ClusterIP while N services of 10
//! backends each are configured, four ways in one run:
//!
//! - `none`: connects straight to a backend with no Lacewing program
//!   attached at all: the baseline every other way is measured against;
//! - `ebpf`: Lacewing's connect-time programs (`lacewing-node --services`);
//! - `iptables`: the rules kube-proxy writes in iptables mode (KUBE-SERVICES,
//!   KUBE-SVC-* with `statistic --mode random`, KUBE-SEP-* DNAT), legacy
//!   iptables, in the node's namespace;
//! - `nftables`: the rules kube-proxy writes in nftables mode (a verdict map
//!   from ClusterIP . protocol . port to a service chain, `numgen random`);
//!
//! With the programs attached it also measures what each of them costs, with
//! the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`, on for
//! two extra runs and restored after, so the rates are measured without
//! their overhead): calls per connection and nanoseconds per call, for a
//! connect to the ClusterIP and for one straight to a pod.
//!
//! ```text
//!   n0-p0 none     ─┐
//!   n0-p1 ebpf     ─┤ wrk, Connection: close
//!   n0-p2 iptables ─┼──▶ n0 ──▶ n0-p4 (nginx on 10 addresses)
//!   n0-p3 nftables ─┘
//! ```
//!
//! Each way has its own client pod: the server keeps TIME_WAIT sockets per
//! client address and port, and a client that reaches the same backend once
//! directly and once through DNAT would trip over them (different TCP
//! timestamp offsets), stalling on SYN retransmits that belong to no way.
//! For the same reason the target service keeps one address at every size.
//! Its rule sits in the middle of KUBE-SERVICES (kube-proxy's order is
//! arbitrary; the middle is the average case). The other services point at
//! addresses nothing listens on; they are never connected to. Each figure is
//! the best of `rounds` measurements.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::wrk;
use crate::lab::{Lab, NodeSpec, PodSpec};

const BACKENDS_PER_SERVICE: u32 = 10;
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

/// Settings of one run.
#[derive(Clone, Debug)]
pub struct Options {
    pub sizes: Vec<u32>,
    pub seconds: u32,
    pub connections: u32,
    pub rounds: u32,
}

/// Connections per second of each way, at one size, and what our programs
/// and maps cost.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub services: u32,
    pub ebpf: f64,
    pub iptables: f64,
    pub nftables: f64,
    /// No Lacewing program attached.
    pub none: f64,
    /// Each pinned map's memory (`bytes_memlock`), by name.
    pub maps: BTreeMap<String, u64>,
    /// Each program's cost on a connect to the ClusterIP.
    pub to_service: BTreeMap<String, Cost>,
    /// Each program's cost on a connect straight to a pod.
    pub to_pod: BTreeMap<String, Cost>,
}

/// What one program cost per connection in a measured run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub calls_per_conn: f64,
    pub ns_per_call: f64,
}

impl Row {
    /// Lacewing's connections per second over no programs at all.
    pub fn ebpf_vs_none(&self) -> f64 {
        self.ebpf / self.none
    }

    /// The wall time a way adds per connection over no programs, in ns
    /// (the inverse of the rates: what the machine spends per connection).
    pub fn added_ns(&self, cps: f64) -> f64 {
        1e9 / cps - 1e9 / self.none
    }

    pub fn map_mb(&self) -> f64 {
        self.maps.values().sum::<u64>() as f64 / 1e6
    }

    fn ns(costs: &BTreeMap<String, Cost>, program: &str) -> f64 {
        costs.get(program).map_or(0.0, |c| c.ns_per_call)
    }
}

pub fn run(node_bin: &Path, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let lab = Lab::new(1, 5)?;
    let node = lab.node("n0")?;
    let (none, ebpf, ipt, nft) = (
        lab.pod("n0-p0")?,
        lab.pod("n0-p1")?,
        lab.pod("n0-p2")?,
        lab.pod("n0-p3")?,
    );
    let server = lab.pod("n0-p4")?;
    let backends = add_backend_addresses(&lab, &node, &server)?;
    let _nginx = lab.start_http_server(&server, BACKEND_PORT, "ok")?;
    // Every measurement: wrk's short connections from one of the clients.
    let wrk = |client: &PodSpec, ip: Ipv4Addr, port: u16| {
        wrk::short_connections(&lab, client, ip, port, opts.connections, opts.seconds)
    };
    println!(
        "bench l4: wrk -c{} for {} s per measurement, best of {}; target service has {} backends; sizes {:?}",
        opts.connections, opts.seconds, opts.rounds, BACKENDS_PER_SERVICE, opts.sizes
    );
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>12} {:>8} {:>10} {:>10} {:>10} {:>8}",
        "services",
        "none_cps",
        "ebpf_cps",
        "iptables_cps",
        "nftables_cps",
        "vs_none",
        "added_ebpf",
        "added_ipt",
        "added_nft",
        "map_mb"
    );

    let mut rows = Vec::new();
    for &size in &opts.sizes {
        let target = size / 2;
        let target_ip = TARGET_IP;
        let mut row = Row {
            services: size,
            ..Row::default()
        };
        // Nothing of ours may be attached for the baseline.
        let links = lacewing_node::loader::links_dir(&lab.node_bpffs_root(&node));
        if std::fs::read_dir(&links).is_ok_and(|mut d| d.next().is_some()) {
            bail!(
                "programs are still linked under {}: the baseline would run them",
                links.display()
            );
        }
        row.none = best_of(opts, || {
            wrk(&none, backends[0], BACKEND_PORT).map(|w| w.rate)
        })?;

        // Lacewing.
        let file = lab.state_dir().join(format!("bench-{size}.yaml"));
        std::fs::write(&file, services_yaml(size, target, &backends))?;
        let args = [std::ffi::OsStr::new("--services"), file.as_os_str()];
        let mut daemon = lab.start_node_daemon_with(&node, node_bin, &args)?;
        lab.wait_node_ready(&node, Duration::from_secs(120))
            .with_context(|| format!("applying {size} services"))?;
        // The kernel balanced them: its per-service connect counters moved.
        row.ebpf = super::on_path(
            &lab,
            "n0",
            "lacewing_service_connections_total",
            100.0,
            "ebpf",
            || best_of(opts, || wrk(&ebpf, target_ip, SERVICE_PORT).map(|w| w.rate)),
        )?;
        // Run-time statistics only for these two runs: they add two clock
        // reads to every program call, which the rates above do not pay.
        let root = lab.node_bpffs_root(&node);
        let stats = BpfStats::on()?;
        row.to_service = costs(&root, || wrk(&ebpf, target_ip, SERVICE_PORT))?;
        row.to_pod = costs(&root, || wrk(&ebpf, backends[1], BACKEND_PORT))?;
        drop(stats);
        row.maps = map_bytes(&root)?;
        daemon.terminate(Duration::from_secs(10))?;

        // kube-proxy, iptables mode.
        let rules = iptables_rules(size, target, &backends);
        netns_stdin(&node.netns(), "iptables-legacy-restore", &[], &rules)?;
        row.iptables = best_of(opts, || wrk(&ipt, target_ip, SERVICE_PORT).map(|w| w.rate))?;
        netns_stdin(
            &node.netns(),
            "iptables-legacy-restore",
            &[],
            "*nat\nCOMMIT\n",
        )?;

        // kube-proxy, nftables mode.
        netns_stdin(
            &node.netns(),
            "nft",
            &["-f", "-"],
            &nft_rules(size, target, &backends),
        )?;
        row.nftables = best_of(opts, || wrk(&nft, target_ip, SERVICE_PORT).map(|w| w.rate))?;
        netns_stdin(
            &node.netns(),
            "nft",
            &["-f", "-"],
            "delete table ip kube-proxy\n",
        )?;

        println!(
            "{:>8} {:>10.0} {:>10.0} {:>12.0} {:>12.0} {:>8.2} {:>10.0} {:>10.0} {:>10.0} {:>8.1}",
            size,
            row.none,
            row.ebpf,
            row.iptables,
            row.nftables,
            row.ebpf_vs_none(),
            row.added_ns(row.ebpf),
            row.added_ns(row.iptables),
            row.added_ns(row.nftables),
            row.map_mb()
        );
        for (name, to_service) in &row.to_service {
            let to_pod = row.to_pod.get(name).copied().unwrap_or_default();
            println!(
                "{:>8}   {name:<16} to a ClusterIP {:>5.2} calls/conn {:>6.0} ns/call; to a pod {:>5.2} calls/conn {:>6.0} ns/call",
                "",
                to_service.calls_per_conn,
                to_service.ns_per_call,
                to_pod.calls_per_conn,
                to_pod.ns_per_call
            );
        }
        rows.push(row);
    }
    if let Some(row) = rows.iter().max_by_key(|r| r.services) {
        println!("map memory at {} services (bytes_memlock):", row.services);
        for (name, bytes) in &row.maps {
            println!("  {name:<18} {:>10.2} MB", *bytes as f64 / 1e6);
        }
    }
    lab.down()?;
    Ok(rows)
}

/// `kernel.bpf_stats_enabled` on for as long as this lives, then as it was.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn on() -> anyhow::Result<Self> {
        let before =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self {
            before: before.trim().to_owned(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.before);
    }
}

/// Each linked program's (calls, ns) so far, by program name.
fn program_stats(root: &Path) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let links = lacewing_node::loader::links_dir(root);
    let mut out = BTreeMap::new();
    // One program may run in several links (sock_ops, one per cgroup):
    // each program is counted once.
    let mut ids = std::collections::BTreeSet::new();
    for entry in
        std::fs::read_dir(&links).with_context(|| format!("listing {}", links.display()))?
    {
        let path = entry?.path();
        let link = bpftool_json(&["link", "show", "pinned"], &path)?;
        let Some(id) = link["prog_id"].as_u64() else {
            continue;
        };
        if !ids.insert(id) {
            continue;
        }
        let prog = bpftool_json(&["prog", "show", "id", &id.to_string()], Path::new(""))?;
        let name = prog["name"].as_str().unwrap_or_default().to_owned();
        let calls = prog["run_cnt"].as_u64().unwrap_or_default();
        let ns = prog["run_time_ns"].as_u64().unwrap_or_default();
        let e = out.entry(name).or_insert((0, 0));
        e.0 += calls;
        e.1 += ns;
    }
    Ok(out)
}

fn bpftool_json(args: &[&str], path: &Path) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new("bpftool");
    cmd.arg("-j").args(args);
    if !path.as_os_str().is_empty() {
        cmd.arg(path);
    }
    let out = cmd.output().context("running bpftool")?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {args:?}"))
}

/// Runs `measure` and returns what each program cost per connection in it.
/// A run in which the connect hook did not run once per connection did not
/// measure the path it names, and fails.
fn costs(
    root: &Path,
    measure: impl FnOnce() -> anyhow::Result<wrk::Wrk>,
) -> anyhow::Result<BTreeMap<String, Cost>> {
    let before = program_stats(root)?;
    let run = measure()?;
    let after = program_stats(root)?;
    anyhow::ensure!(run.requests > 0, "wrk made no connection");
    let mut out = BTreeMap::new();
    for (name, (calls, ns)) in after {
        let (calls0, ns0) = before.get(&name).copied().unwrap_or_default();
        let (calls, ns) = (calls - calls0, ns - ns0);
        out.insert(
            name,
            Cost {
                calls_per_conn: calls as f64 / run.requests as f64,
                ns_per_call: if calls == 0 {
                    0.0
                } else {
                    ns as f64 / calls as f64
                },
            },
        );
    }
    anyhow::ensure!(
        out.contains_key(mesh_common::names::SOCK_OPS_PROGRAM),
        "no link runs {}: its calls were not measured",
        mesh_common::names::SOCK_OPS_PROGRAM
    );
    let connects = out.get("lw_connect4").map_or(0.0, |c| c.calls_per_conn);
    anyhow::ensure!(
        connects >= 0.99,
        "lw_connect4 ran {connects:.2} times per connection: the run did not take the connect hook (is kernel.bpf_stats_enabled honoured?)"
    );
    Ok(out)
}

/// The closing line the issue asks for, from the largest size.
/// `getpeername_ns` is the dearer of the two connects (to a ClusterIP, to a
/// pod); `sockops_calls_per_conn` is for a connect straight to a pod, a
/// connection that is nothing of the mesh's.
pub fn result_line(rows: &[Row]) -> Option<String> {
    let r = rows.iter().max_by_key(|r| r.services)?;
    let getpeername =
        Row::ns(&r.to_service, "lw_getpeername4").max(Row::ns(&r.to_pod, "lw_getpeername4"));
    let sockops = r
        .to_pod
        .get(mesh_common::names::SOCK_OPS_PROGRAM)
        .map_or(0.0, |c| c.calls_per_conn);
    Some(format!(
        "RESULT l4 services={} ebpf_cps={:.0} none_cps={:.0} iptables_cps={:.0} nftables_cps={:.0} ebpf_vs_none={:.2} added_ns_ebpf={:.0} added_ns_iptables={:.0} added_ns_nftables={:.0} connect4_ns={:.0} getpeername_ns={getpeername:.0} sockops_calls_per_conn={sockops:.2} map_mem_mb={:.1}",
        r.services,
        r.ebpf,
        r.none,
        r.iptables,
        r.nftables,
        r.ebpf_vs_none(),
        r.added_ns(r.ebpf),
        r.added_ns(r.iptables),
        r.added_ns(r.nftables),
        Row::ns(&r.to_service, "lw_connect4"),
        r.map_mb()
    ))
}

/// Gives the server pod 10 more addresses (10.244.0.100-109), routed by the
/// node, so the target service has 10 real backends.
fn add_backend_addresses(
    lab: &Lab,
    node: &NodeSpec,
    server: &PodSpec,
) -> anyhow::Result<Vec<Ipv4Addr>> {
    let addrs: Vec<Ipv4Addr> = (0..BACKENDS_PER_SERVICE)
        .map(|i| Ipv4Addr::new(10, 244, 0, 100 + i as u8))
        .collect();
    let pod_script: String = addrs
        .iter()
        .map(|a| format!("addr add {a}/32 dev eth0\n"))
        .collect();
    let link = lab.pod_link(server)?;
    let node_script: String = addrs
        .iter()
        .map(|a| format!("route add {a}/32 dev {link}\n"))
        .collect();
    netns_stdin(&server.netns(), "ip", &["-batch", "-"], &pod_script)?;
    netns_stdin(&node.netns(), "ip", &["-batch", "-"], &node_script)?;
    Ok(addrs)
}

/// The target service's address, the same at every size.
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 255, 1);

/// Address of service `i` of a run whose target is `target`.
fn service_ip_of(i: u32, target: u32) -> Ipv4Addr {
    if i == target {
        TARGET_IP
    } else {
        service_ip(i)
    }
}

fn service_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn best_of(
    opts: &Options,
    mut measure: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<f64> {
    let mut best = 0.0f64;
    for _ in 0..opts.rounds.max(1) {
        best = best.max(measure()?);
    }
    Ok(best)
}

/// Backends of a service that is not the target: addresses nothing uses.
fn fake_backend(service: u32, j: u32) -> Ipv4Addr {
    let n = service * BACKENDS_PER_SERVICE + j;
    Ipv4Addr::new(10, 250 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn backends_of(i: u32, target: u32, real: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    if i == target {
        real.to_vec()
    } else {
        (0..BACKENDS_PER_SERVICE)
            .map(|j| fake_backend(i, j))
            .collect()
    }
}

fn services_yaml(size: u32, target: u32, real: &[Ipv4Addr]) -> String {
    let mut out = String::new();
    for i in 0..size {
        let eps: String = backends_of(i, target, real)
            .iter()
            .map(|b| format!("  - addresses: [\"{b}\"]\n"))
            .collect();
        let _ = write!(
            out,
            "kind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: {SERVICE_PORT}, protocol: TCP}}]\n---\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {{name: s{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\nports: [{{name: http, port: {BACKEND_PORT}, protocol: TCP}}]\nendpoints:\n{eps}---\n",
            ip = service_ip_of(i, target),
        );
    }
    out
}

/// kube-proxy's iptables-mode NAT rules for `size` services.
fn iptables_rules(size: u32, target: u32, real: &[Ipv4Addr]) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    for i in 0..size {
        let svc = format!("KUBE-SVC-{i:016X}");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/s{i}:http cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            service_ip_of(i, target)
        );
        let backends = backends_of(i, target, real);
        let n = backends.len();
        for (j, b) in backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:011X}{j:05X}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            if j + 1 < n {
                let p = 1.0 / (n - j) as f64;
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/s{i}:http -> {b}:{BACKEND_PORT}\" -m statistic --mode random --probability {p:.11} -j {sep}"
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"bench/s{i}:http -> {b}:{BACKEND_PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"bench/s{i}:http\" -m tcp -j DNAT --to-destination {b}:{BACKEND_PORT}"
            );
        }
    }
    format!("{chains}{rules}COMMIT\n")
}

/// kube-proxy's nftables-mode rules: one verdict-map lookup per new
/// connection, then a random pick among the service's endpoint chains.
fn nft_rules(size: u32, target: u32, real: &[Ipv4Addr]) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    let mut elements = Vec::new();
    for i in 0..size {
        let backends = backends_of(i, target, real);
        let mut vmap = Vec::new();
        for (j, b) in backends.iter().enumerate() {
            let _ = writeln!(
                out,
                "  chain endpoint-{i}-{j} {{\n    meta l4proto tcp dnat to {b}:{BACKEND_PORT}\n  }}"
            );
            vmap.push(format!("{j} : goto endpoint-{i}-{j}"));
        }
        let _ = writeln!(
            out,
            "  chain service-{i} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            backends.len(),
            vmap.join(", ")
        );
        elements.push(format!(
            "{} . tcp . {SERVICE_PORT} : goto service-{i}",
            service_ip_of(i, target)
        ));
    }
    let _ = writeln!(
        out,
        "  map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ {} }} }}",
        elements.join(", ")
    );
    out.push_str(
        "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n",
    );
    out.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority -100; policy accept;\n    jump services\n  }\n");
    out.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n}\n");
    out
}

/// The kernel's memory accounting (`bytes_memlock`) of each pinned map; a
/// map of maps counts its inner maps too (they are not pinned themselves).
fn map_bytes(root: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut each = BTreeMap::new();
    for name in mesh_common::names::ALL_MAPS {
        let path = lacewing_node::maps::pin_path(root, name);
        let v = bpftool_json(&["map", "show", "pinned"], &path)?;
        let mut bytes = memlock(&v)?;
        if v["type"].as_str().is_some_and(|t| t.ends_with("_of_maps")) {
            for id in inner_map_ids(&bpftool_json(&["map", "dump", "pinned"], &path)?)? {
                bytes += memlock(&bpftool_json(
                    &["map", "show", "id", &id.to_string()],
                    Path::new(""),
                )?)?;
            }
        }
        each.insert((*name).to_owned(), bytes);
    }
    Ok(each)
}

fn memlock(show: &serde_json::Value) -> anyhow::Result<u64> {
    show["bytes_memlock"]
        .as_u64()
        .with_context(|| format!("bpftool shows no bytes_memlock: {show}"))
}

/// The inner map ids a map-of-maps dump holds: each value is one, as four
/// bytes in host (little-endian) order.
fn inner_map_ids(dump: &serde_json::Value) -> anyhow::Result<Vec<u32>> {
    let entries = dump.as_array().context("bpftool map dump: not a list")?;
    entries
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["value"]
                .as_array()
                .context("no raw value")?
                .iter()
                .map(|b| {
                    let hex = b.as_str().unwrap_or_default().trim_start_matches("0x");
                    u8::from_str_radix(hex, 16).context("not a hex byte")
                })
                .collect::<anyhow::Result<_>>()?;
            let id: [u8; 4] = bytes.try_into().ok().context("not a 4-byte map id")?;
            Ok(u32::from_le_bytes(id))
        })
        .collect::<anyhow::Result<_>>()
        .with_context(|| format!("reading inner map ids from {dump}"))
}

/// Runs `program args` in the named namespace with `input` on stdin.
fn netns_stdin(netns: &str, program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} in {netns}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_rules_have_one_portal_per_service_and_a_dnat_per_backend() {
        let real: Vec<Ipv4Addr> = (0..10)
            .map(|i| Ipv4Addr::new(10, 244, 0, 100 + i))
            .collect();
        let ipt = iptables_rules(3, 1, &real);
        assert_eq!(ipt.matches("-A KUBE-SERVICES").count(), 3);
        assert_eq!(ipt.matches("-j DNAT").count(), 30);
        assert!(ipt.contains("--to-destination 10.244.0.105:8080"));
        let nft = nft_rules(3, 1, &real);
        assert_eq!(nft.matches("dnat to").count(), 30);
        assert!(nft.contains("10.96.255.1 . tcp . 80 : goto service-1"));
        let ids: std::collections::HashSet<_> = (0..20_000).map(service_ip).collect();
        assert_eq!(ids.len(), 20_000, "service addresses must be distinct");
    }

    #[test]
    fn inner_map_ids_are_read_from_a_map_of_maps_dump() {
        let dump = serde_json::json!([
            {"key": ["0x01", "0x00"], "value": ["0x1e", "0xdd", "0x00", "0x00"]},
            {"key": ["0x02", "0x00"], "value": ["0x01", "0x00", "0x01", "0x00"]},
        ]);
        assert_eq!(inner_map_ids(&dump).unwrap(), [0xdd1e, 0x1_0001]);
        let bad = serde_json::json!([{"key": ["0x01"], "value": ["0x01"]}]);
        assert!(inner_map_ids(&bad).is_err());
    }
}
