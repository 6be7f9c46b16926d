//! The `lacewing` command line: the lab, map inspection, and the demo.

mod ca;
mod demo;
mod explain;
mod lab;
mod manifests;
mod maps;
mod routes;
mod status;
mod top;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Lacewing: an eBPF-accelerated, sidecarless service mesh.
#[derive(Debug, Parser)]
#[command(name = "lacewing", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local cluster in network namespaces (root).
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// The controller's view: each node's applied version, lag and last NACK.
    Status {
        /// The controller's status address (host:15014).
        #[arg(long, conflicts_with = "lab")]
        controller: Option<String>,
        /// Ask the controller of this lab (the only one up, if not named).
        #[arg(long)]
        lab: Option<Option<crate::lab::LabId>>,
    },
    /// A node's HTTP routes as its daemon holds them: each routed Service
    /// frontend, its rules in precedence order, and their backends.
    Routes {
        /// The node daemon's metrics address (host:15020).
        #[arg(long, conflicts_with = "lab")]
        node_addr: Option<String>,
        /// Ask this lab's node named by --node (the only lab up, if not named).
        #[arg(long)]
        lab: Option<Option<crate::lab::LabId>>,
        /// The lab node.
        #[arg(long, default_value = "n0")]
        node: String,
    },
    /// Write (or with --check, compare) the CRD YAML generated from the types.
    Manifests {
        /// Folder of the CRD files.
        #[arg(long, default_value = "deploy/crds")]
        out: PathBuf,
        /// Only check that the files are current; exit 1 if not.
        #[arg(long)]
        check: bool,
    },
    /// Read a node's pinned maps.
    #[command(subcommand)]
    Maps(maps::MapsCommand),
    /// Show, or turn on or off, a node's same-node acceleration (sockmap
    /// splicing of local hops), at once and without a restart. Connections
    /// already spliced keep working either way.
    Acceleration {
        /// `on` or `off`; without it, show the switch and the sockhash.
        state: Option<maps::Switch>,
        /// Also switch the kernel fast path (same-node pod to pod with no
        /// daemon hop), which works only with acceleration on.
        #[arg(long)]
        fast_path: Option<maps::Switch>,
        /// The node daemon's bpffs root.
        #[arg(long, default_value_os_t = lacewing_sys::bpffs::default_root())]
        bpffs_root: PathBuf,
    },
    /// Open one tunnel stream as a node daemon would, with the given
    /// workload certificate, send a line and print the answer (to check what
    /// a node's :15008 accepts).
    TunnelProbe {
        #[command(flatten)]
        probe: Probe,
        /// The line to send.
        #[arg(long, default_value = "probe")]
        send: String,
    },
    /// Ask the controller to sign a workload certificate with a node's
    /// credentials, as the node daemon does (to check what a node may get).
    CertRequest {
        /// The controller (https://host:15012).
        #[arg(long)]
        controller: String,
        /// The node's credentials (ca.pem, cert.pem, key.pem).
        #[arg(long)]
        tls_dir: PathBuf,
        /// The pod, namespace/name.
        #[arg(long)]
        pod: String,
        /// The SPIFFE identity to ask for.
        #[arg(long)]
        identity: String,
    },
    /// Rotate the mesh CA in folder mode: prepare, activate, finish.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Benchmarks in the lab (run them through `cargo xtask bench`).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Bring up a 2-node lab, run the node daemon on each node, make
    /// connections from pods, print what the kernel counted, tear down.
    Demo,
    /// Why a connection or request from a pod to a destination goes where
    /// it goes, or fails: the kernel's view, the source's daemon (route,
    /// backends, ejections, TrafficPolicy), the destination (mTLS mode,
    /// AuthorizationPolicies) and the verdict. Exit code 0: allowed; 2:
    /// refused or denied; 3: undecided.
    Explain {
        /// The source pod: its IP, or namespace/name.
        source: String,
        /// A Service (namespace/name:port), a ClusterIP:port or a pod IP:port.
        destination: String,
        /// The request's method (for routes and L7 policies).
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request's path.
        #[arg(long, default_value = "/")]
        path: String,
        /// A request header, `name:value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Ask the daemons of this lab (the only one up, if not named).
        #[arg(long)]
        lab: Option<Option<crate::lab::LabId>>,
        /// This node's daemon's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:15000", conflicts_with = "lab")]
        admin_addr: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Live request rate, success rate and p50/p99 latency per workload and
    /// route, with each node's connections and tunnel bytes, refreshed every
    /// interval (as `linkerd viz top`).
    Top {
        #[command(flatten)]
        from: MetricsFrom,
        /// Print one table and exit.
        #[arg(long)]
        once: bool,
    },
    /// One table of `lacewing top` (as `linkerd viz stat`).
    Stat {
        #[command(flatten)]
        from: MetricsFrom,
    },
}

/// How a command prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Which node daemons' metrics `top` and `stat` read.
#[derive(Debug, clap::Args)]
pub struct MetricsFrom {
    /// Node daemons' metrics addresses (host:15020), comma separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "lab")]
    node_addr: Vec<String>,
    /// Read every node of this lab (the only one up, if not named).
    #[arg(long)]
    lab: Option<Option<crate::lab::LabId>>,
    /// Time between the two reads a table compares.
    #[arg(long, default_value = "2s", value_parser = lacewing_core::duration::parse)]
    interval: std::time::Duration,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

impl MetricsFrom {
    fn source(&self) -> anyhow::Result<top::Source> {
        Ok(match (&self.lab, self.node_addr.is_empty()) {
            (Some(id), _) => top::Source::Lab(crate::lab::Lab::open(lab::resolve(*id)?)?),
            (None, false) => top::Source::Addrs(self.node_addr.clone()),
            (None, true) => top::Source::Addrs(vec!["127.0.0.1:15020".into()]),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// A real controller serving simulated nodes over gRPC (no eBPF): full
    /// sync time, change propagation, bytes per change, controller memory.
    ControlPlane {
        #[arg(long, default_value_t = 1000)]
        nodes: u32,
        #[arg(long, default_value_t = 10_000)]
        services: u32,
        #[arg(long, default_value_t = 100_000)]
        endpoints: u32,
        /// Single-endpoint edits to time.
        #[arg(long, default_value_t = 20)]
        changes: u32,
    },
    /// Pod to pod across nodes, no mesh vs Lacewing STRICT: iperf3
    /// throughput, sockperf latency, node daemon memory and CPU.
    Tunnel {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 15)]
        seconds: u32,
        /// Runs of each measurement; the median is kept.
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// Pod to pod on one node, four ways: no mesh, acceleration off,
    /// daemon hops spliced (sockmap), kernel fast path.
    Local {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 15)]
        seconds: u32,
        /// Runs of each measurement; the median is kept.
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// HTTP/1.1 and h2c requests to a Service across nodes: no mesh, an
    /// nginx reverse proxy, the mesh at L4 and at L7 (h2load).
    L7 {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
    /// Node daemons upgraded under load (HTTP/1.1 keep-alive and a new
    /// connection per request across nodes): failures, resets, and p99
    /// latency around upgrades against steady state.
    Upgrade {
        /// How long the load runs.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// How often each node's daemon is upgraded.
        #[arg(long, default_value_t = 10)]
        interval: u32,
    },
    /// Mixed traffic for N minutes while the mesh changes (config every
    /// 5 s, 20-second certificates, one upgrade): fails on any failed
    /// request or on RSS, open files or sockhash entries that grow after
    /// warm-up (run it with `cargo xtask soak --minutes N`).
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u32,
    },
    /// Short TCP connections to a ClusterIP: Lacewing vs kube-proxy
    /// (iptables, nftables) vs a direct connect.
    L4 {
        /// Numbers of configured services (10 backends each).
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        sizes: Vec<u32>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Concurrent wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Measurements per figure; the best is kept.
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
}

/// GET `path` from `who` at `addr` over plain HTTP/1.0 (read-only; no
/// client library needed) and reads its JSON.
fn get_json<T: serde::de::DeserializeOwned>(
    addr: &str,
    path: &str,
    who: &str,
) -> anyhow::Result<T> {
    let body = get_text(addr, path, who)?;
    serde_json::from_str(&body)
        .with_context(|| format!("{who}'s {path} is not what this CLI expects"))
}

/// GET `path` from `who` at `addr` over plain HTTP/1.0: the body of a 200.
fn get_text(addr: &str, path: &str, who: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)
        .with_context(|| format!("connecting to {who} at {addr}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{who}'s reply has no body"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{who} answered: {head}"
    );
    Ok(body.to_owned())
}

/// Runs the parsed command; the exit code to return.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Lab(cmd) => lab::run(cmd),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Maps(cmd) => maps::run(cmd).map(|()| 0),
        Command::Acceleration {
            state,
            fast_path,
            bpffs_root,
        } => {
            print!("{}", maps::acceleration(&bpffs_root, state, fast_path)?);
            Ok(0)
        }
        Command::Manifests { out, check } => manifests::run(&out, check),
        Command::Status { controller, lab } => match (controller, lab) {
            (Some(url), _) => status::run(&url),
            (None, Some(lab)) => status::run_in_lab(lab),
            (None, None) => status::run("127.0.0.1:15014"),
        },
        Command::Routes {
            node_addr,
            lab,
            node,
        } => match (node_addr, lab) {
            (Some(addr), _) => routes::run(&addr),
            (None, Some(lab)) => routes::run_in_lab(lab, &node),
            (None, None) => routes::run("127.0.0.1:15020"),
        },
        Command::Demo => demo::run().map(|()| 0),
        Command::Explain {
            source,
            destination,
            method,
            path,
            headers,
            lab,
            admin_addr,
            output,
        } => explain::run(
            lab,
            &admin_addr,
            &explain::Question {
                source,
                destination,
                method,
                path,
                headers,
            },
            output == Output::Json,
        ),
        Command::Top { from, once } => top::run(
            &from.source()?,
            from.interval,
            once,
            from.output == Output::Json,
        ),
        Command::Stat { from } => top::run(
            &from.source()?,
            from.interval,
            true,
            from.output == Output::Json,
        ),
        Command::TunnelProbe { probe, send } => report(probe.run(&send)),
        Command::CertRequest {
            controller,
            tls_dir,
            pod,
            identity,
        } => cert_request(controller, tls_dir, &pod, &identity),
        Command::Bench(BenchCommand::ControlPlane {
            nodes,
            services,
            endpoints,
            changes,
        }) => {
            let opts = crate::bench::control_plane::Options {
                nodes,
                services,
                endpoints,
                changes,
            };
            let outcome =
                crate::bench::control_plane::run(&sibling_binary("lacewing-controller")?, &opts)?;
            println!(
                "controller peak RSS {:.0} MB, CPU {:.1} s",
                outcome.controller_rss_mb, outcome.controller_cpu_s
            );
            println!(
                "{}",
                crate::bench::control_plane::result_line(&opts, &outcome)
            );
            Ok(0)
        }
        Command::Bench(BenchCommand::L7 { seconds }) => {
            let dir = binaries_dir()?;
            let o = crate::bench::l7::run(&dir, &crate::bench::l7::Options { seconds })?;
            println!(
                "{:>4} {:>5} {:>10} {:>10} {:>10} {:>10}   p50/p99 us at 1k req/s: direct, nginx, L4, L7",
                "", "bytes", "direct", "nginx", "mesh L4", "mesh L7"
            );
            for r in &o.rows {
                println!(
                    "{:>4} {:>5} {:>10.0} {:>10.0} {:>10.0} {:>10.0}   {:.0}/{:.0} {:.0}/{:.0} {:.0}/{:.0} {:.0}/{:.0}",
                    r.protocol,
                    r.bytes,
                    r.direct.max_rps,
                    r.nginx.max_rps,
                    r.l4.max_rps,
                    r.l7.max_rps,
                    r.direct.p50_1k_us,
                    r.direct.p99_1k_us,
                    r.nginx.p50_1k_us,
                    r.nginx.p99_1k_us,
                    r.l4.p50_1k_us,
                    r.l4.p99_1k_us,
                    r.l7.p50_1k_us,
                    r.l7.p99_1k_us,
                );
            }
            println!("{}", crate::bench::l7::result_line(&o));
            Ok(0)
        }
        Command::Bench(BenchCommand::Local { seconds, rounds }) => {
            let dir = binaries_dir()?;
            let o =
                crate::bench::local::run(&dir, &crate::bench::tunnel::Options { seconds, rounds })?;
            for (name, f) in [
                ("no mesh", &o.no_mesh),
                ("acceleration off", &o.off),
                ("sockmap", &o.sockmap),
                ("fast path", &o.fast_path),
            ] {
                println!(
                    "{name:>16}: {:.2} Gbit/s, pp p50 {:.1} us, p99 {:.1} us; ul p50 {:.1} us, p99 {:.1} us",
                    f.gbits, f.pp_p50_us, f.pp_p99_us, f.ul_p50_us, f.ul_p99_us
                );
            }
            println!("{}", crate::bench::local::result_line(&o));
            Ok(0)
        }
        Command::Bench(BenchCommand::Upgrade { seconds, interval }) => {
            let dir = binaries_dir()?;
            let o = crate::bench::upgrade::run(
                &dir,
                &crate::bench::upgrade::Options { seconds, interval },
            )?;
            println!(
                "takeovers (ms from the new daemon's start): {}",
                o.takeover_ms
                    .iter()
                    .map(|ms| format!("{ms:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            println!("{}", crate::bench::upgrade::result_line(&o));
            Ok(0)
        }
        Command::Bench(BenchCommand::Soak { minutes }) => {
            let dir = binaries_dir()?;
            let o = crate::bench::soak::run(&dir, &crate::bench::soak::Options { minutes })?;
            for s in &o.samples {
                println!("{}", crate::bench::soak::sample_line(s));
            }
            println!("{}", crate::bench::soak::result_line(&o));
            if o.failed > 0 || !o.growing.is_empty() {
                eprintln!(
                    "soak failed: {} of {} requests failed; growing after warm-up: {}",
                    o.failed,
                    o.requests,
                    if o.growing.is_empty() {
                        "nothing".to_owned()
                    } else {
                        o.growing.join(", ")
                    }
                );
                return Ok(1);
            }
            Ok(0)
        }
        Command::Bench(BenchCommand::Tunnel { seconds, rounds }) => {
            let dir = binaries_dir()?;
            let outcome = crate::bench::tunnel::run(
                &dir,
                &crate::bench::tunnel::Options { seconds, rounds },
            )?;
            println!(
                "direct: {:.2} Gbit/s, ul p50 {:.1} us, p99 {:.1} us, pp {:.1} us",
                outcome.direct.gbits,
                outcome.direct.ul_p50_us,
                outcome.direct.ul_p99_us,
                outcome.direct.pp_avg_us
            );
            println!(
                "mesh:   {:.2} Gbit/s, ul p50 {:.1} us, p99 {:.1} us, pp {:.1} us",
                outcome.mesh.gbits,
                outcome.mesh.ul_p50_us,
                outcome.mesh.ul_p99_us,
                outcome.mesh.pp_avg_us
            );
            println!("{}", crate::bench::tunnel::result_line(&outcome));
            Ok(0)
        }
        Command::Bench(BenchCommand::L4 {
            sizes,
            seconds,
            connections,
            rounds,
        }) => {
            let opts = crate::bench::l4::Options {
                sizes,
                seconds,
                connections,
                rounds,
            };
            let rows = crate::bench::l4::run(&sibling_binary("lacewing-node")?, &opts)?;
            if let Some(line) = crate::bench::l4::result_line(&rows) {
                println!("{line}");
            }
            Ok(0)
        }
    }
}

fn cert_request(url: String, tls_dir: PathBuf, pod: &str, identity: &str) -> anyhow::Result<i32> {
    let (namespace, name) = pod
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--pod `{pod}` is not namespace/name"))?;
    let controller = lacewing_node::config::Controller {
        url,
        tls_dir,
        server_name: lacewing_core::pki::CONTROLLER_SERVER_NAME.to_owned(),
    };
    report(async {
        let svid = lacewing_node::identity::request(&controller, identity, namespace, name).await?;
        let left = svid
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        Ok(format!(
            "issued {} valid for {} s more",
            svid.identity,
            left.as_secs()
        ))
    })
}

/// Runs a one-shot check: prints its answer (exit 0) or why it was refused
/// (exit 1).
fn report(check: impl std::future::Future<Output = anyhow::Result<String>>) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(check) {
        Ok(answer) => {
            println!("{answer}");
            Ok(0)
        }
        Err(err) => {
            eprintln!("refused: {err}");
            Ok(1)
        }
    }
}

/// One tunnel stream opened by hand.
#[derive(Debug, clap::Args)]
pub struct Probe {
    /// The workload certificate (PEM), its key and the trust bundle.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    ca: PathBuf,
    /// The destination node's tunnel address (ip:15008) and name.
    #[arg(long)]
    node_addr: std::net::SocketAddr,
    #[arg(long)]
    node: String,
    /// The destination pod (ip:port) and the source pod's address.
    #[arg(long)]
    to: std::net::SocketAddr,
    #[arg(long)]
    source: std::net::IpAddr,
}

impl Probe {
    async fn run(&self, send: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let cert = std::fs::read_to_string(&self.cert)?;
        let svid = lacewing_core::pki::Svid {
            identity: lacewing_core::pki::uri_sans(
                &lacewing_core::pki::pem_to_der(&cert).unwrap_or_default(),
            )
            .into_iter()
            .next()
            .unwrap_or_default(),
            not_after: lacewing_core::pki::not_after(&cert).unwrap_or(std::time::UNIX_EPOCH),
            cert_chain_pem: vec![cert],
            key_pem: std::fs::read_to_string(&self.key)?,
        };
        let roots = lacewing_tunnel::tls::roots(&std::fs::read_to_string(&self.ca)?)?;
        let dest = lacewing_tunnel::client::Destination {
            node: self.node_addr,
            node_identity: lacewing_core::pki::node_identity(
                lacewing_core::pki::DEFAULT_TRUST_DOMAIN,
                &self.node,
            ),
            pod: self.to,
        };
        let stream = lacewing_tunnel::client::Pool::new(None)
            .open(&svid, "probe", roots, self.source, &dest)
            .await?;
        let mut io = tokio::io::BufReader::new(hyper_util::rt::TokioIo::new(stream));
        io.get_mut()
            .write_all(format!("R{send}\n").as_bytes())
            .await?;
        let mut line = String::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), io.read_line(&mut line)).await??;
        Ok(line.trim().to_owned())
    }
}

/// A sibling binary of the running one (`lacewing-node` next to `lacewing`).
/// The folder of the lacewing binaries (where `lacewing-node` is).
fn binaries_dir() -> anyhow::Result<PathBuf> {
    let bin = sibling_binary("lacewing-node")?;
    bin.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("{} has no folder", bin.display()))
}

pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found next to {}: build the workspace (`cargo build`)",
        name,
        exe.display()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
