//! `lacewing-node` settings: flags with environment fallbacks, then validation
//! with an error that says what to fix.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use lacewing_core::model::services::ServiceCidr;
use lacewing_sys::bpffs;
use lacewing_sys::cgroup;
use lacewing_sys::telemetry::LogFormat;

/// Environment names, as in the DaemonSet manifest.
pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_CGROUP_ROOT: &str = "LACEWING_CGROUP_ROOT";
pub const ENV_DAEMON_CGROUP: &str = "LACEWING_DAEMON_CGROUP";
pub const ENV_POD_UID: &str = "POD_UID";
pub const ENV_BPFFS_ROOT: &str = "LACEWING_BPFFS_ROOT";
pub const ENV_SERVICES_FILE: &str = "LACEWING_SERVICES_FILE";
pub const ENV_METRICS_ADDR: &str = "LACEWING_METRICS_ADDR";
pub const ENV_KEEP_DATAPATH: &str = "LACEWING_KEEP_DATAPATH";
pub const ENV_CONTROLLER: &str = "LACEWING_CONTROLLER";
pub const ENV_TLS_DIR: &str = "LACEWING_TLS_DIR";
pub const ENV_SERVICE_CIDRS: &str = "LACEWING_SERVICE_CIDRS";
/// Kubernetes' default IPv4 service CIDR, and the lab's IPv6 one.
pub const DEFAULT_SERVICE_CIDRS: &str = "10.96.0.0/12,fd00:96::/108";
pub const ENV_ACCELERATION: &str = "LACEWING_ACCELERATION";
pub const ENV_FAST_PATH: &str = "LACEWING_FAST_PATH";
pub const ENV_MAGLEV_CAPACITY: &str = "LACEWING_MAGLEV_CAPACITY";
pub const ENV_DRAIN_TIMEOUT: &str = "LACEWING_DRAIN_TIMEOUT";
pub const ENV_WORKERS: &str = "LACEWING_WORKERS";
/// Worker threads by default: two, as ztunnel runs, so one busy connection
/// does not hold up the rest of the node while memory stays small.
pub const DEFAULT_WORKERS: usize = 2;
/// More workers than this is a typo, not a node (each is a thread that
/// polls the node's sockets).
pub const MAX_WORKERS: usize = 64;
/// How long SIGTERM lets open connections finish (Kubernetes' default
/// terminationGracePeriodSeconds is 30 s; the chart gives the pod more).
pub const DEFAULT_DRAIN_TIMEOUT: &str = "30s";
/// The kernel object's own size of `LW_MAGLEV`.
pub const DEFAULT_MAGLEV_CAPACITY: u32 = 1 << 20;
/// Metrics and health, on every address (Prometheus scrapes the node IP).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";

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
    /// This daemon's own cgroup v2 directory, where sock_ops is attached
    /// for the sockets it listens on and makes. Default: its pod's cgroup
    /// (`POD_UID`, found below --cgroup-root), else read from
    /// /proc/self/cgroup.
    #[arg(long, env = ENV_DAEMON_CGROUP)]
    pub daemon_cgroup: Option<PathBuf>,
    /// The daemon's pod UID (the chart passes metadata.uid): its cgroup.
    #[arg(long, env = ENV_POD_UID, hide = true)]
    pub pod_uid: Option<String>,
    /// Folder on bpffs where maps and links are pinned.
    #[arg(long, env = ENV_BPFFS_ROOT, default_value_os_t = bpffs::default_root())]
    pub bpffs_root: PathBuf,
    /// A file of Kubernetes Services and EndpointSlices (YAML) to balance,
    /// re-read when it changes. (The controller's stream replaces it.)
    #[arg(long, env = ENV_SERVICES_FILE)]
    pub services: Option<PathBuf>,
    /// The controller to subscribe to (`http://host:15012`), instead of
    /// --services.
    #[arg(long, env = ENV_CONTROLLER, conflicts_with = "services", requires = "tls_dir")]
    pub controller: Option<String>,
    /// The node's credentials for the controller: ca.pem, cert.pem, key.pem
    /// (a certificate naming this node).
    #[arg(long, env = ENV_TLS_DIR)]
    pub tls_dir: Option<PathBuf>,
    /// The name on the controller's certificate.
    #[arg(long, default_value = lacewing_core::pki::CONTROLLER_SERVER_NAME)]
    pub controller_server_name: String,
    /// Entries all Maglev tables may hold together (each takes its table
    /// size, 4 bytes an entry; memory is only what the tables use). A
    /// service whose table would pass it keeps its previous state and the
    /// node reports the error. Lower it to bound memory.
    #[arg(long, env = ENV_MAGLEV_CAPACITY, default_value_t = DEFAULT_MAGLEV_CAPACITY)]
    pub maglev_capacity: u32,
    /// The cluster's service CIDRs: a connect to an address in them that is
    /// no service is refused (a deleted or unallocated ClusterIP).
    #[arg(long, env = ENV_SERVICE_CIDRS, value_delimiter = ',', default_value = DEFAULT_SERVICE_CIDRS)]
    pub service_cidr: Vec<ServiceCidr>,
    /// Address of the metrics and health endpoint.
    #[arg(long, env = ENV_METRICS_ADDR, default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// On SIGTERM, leave the programs attached and the maps pinned, so service
    /// load balancing goes on until the next lacewing-node takes over (rolling
    /// upgrades). Without it, SIGTERM detaches everything.
    #[arg(long, env = ENV_KEEP_DATAPATH)]
    pub keep_datapath: bool,
    /// In a cluster: the daemon's projected ServiceAccount token (audience
    /// `lacewing`), with which it bootstraps its node certificate into
    /// --tls-dir when that holds none.
    #[arg(long, env = "LACEWING_BOOTSTRAP_TOKEN_FILE", requires = "ca_file")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// The mesh's root certificate, to trust the controller when
    /// bootstrapping (the controller publishes it in ConfigMap
    /// `lacewing-ca-root`).
    #[arg(long, env = "LACEWING_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Capture meshed pods: a folder with one file per pod address holding
    /// the path of the pod's network namespace and, on a second line, the
    /// pod's UID (written by the pod network; in the lab, by the lab).
    #[arg(long, env = "LACEWING_POD_NETNS_DIR", requires = "controller")]
    pub pod_netns_dir: Option<PathBuf>,
    /// Capture meshed pods the `lacewing-cni` plugin hands over on this
    /// Unix socket (made root-only; the namespaces known to be meshed are
    /// written beside it, for the plugin to go by when the daemon is down).
    #[arg(long, env = "LACEWING_CNI_SOCKET", requires = "controller")]
    pub cni_socket: Option<PathBuf>,
    /// Where the tunnel (HBONE, mutual TLS) listens, with --controller.
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub tunnel_addr: SocketAddr,
    /// The trust domain of workload identities
    /// (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "LACEWING_TRUST_DOMAIN", default_value = lacewing_core::pki::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Same-node acceleration: splice the sockets of local hops (app to
    /// daemon inside a pod, daemon to a pod here) through a sockhash, so
    /// their bytes skip the TCP/IP stack. `false` is the escape hatch; at
    /// run time, `lacewing acceleration on|off` flips it without restarting.
    #[arg(long, env = ENV_ACCELERATION, default_value_t = true, action = clap::ArgAction::Set)]
    pub acceleration: bool,
    /// The kernel fast path (with --acceleration): a meshed pod's connection
    /// to a meshed pod on this node goes straight to it, with no daemon hop,
    /// when L4 policy alone decides the pair (allowed, or refused at
    /// connect). `false` keeps every connection through the daemon.
    #[arg(long, env = ENV_FAST_PATH, default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_path: bool,
    /// On SIGTERM: stop accepting, send GOAWAY on tunnel connections, and
    /// let established connections finish for up to this long (`30s`,
    /// `2m`); then close what is left and exit.
    #[arg(long, env = ENV_DRAIN_TIMEOUT, default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = lacewing_core::duration::parse)]
    pub drain_timeout: Duration,
    /// How long a new pod's first connection waits for the pod's
    /// certificate while the node is getting it, before it is refused.
    #[arg(long, env = "LACEWING_CERTIFICATE_WAIT", default_value = "5s", value_parser = lacewing_core::duration::parse)]
    pub certificate_wait: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Access-log every connection and request this node carries (else only
    /// those of namespaces the MeshConfig's `accessLogging` names).
    #[arg(long, env = "LACEWING_ACCESS_LOG")]
    pub access_log: bool,
    /// Where access log lines go: `stdout` or a file (appended to).
    #[arg(long, env = "LACEWING_ACCESS_LOG_FILE", default_value = "stdout")]
    pub access_log_file: lacewing_proxy::telemetry::access_log::Sink,
    /// Access log lines waiting to be written at most; more are dropped and
    /// counted (`lacewing_access_log_lines_total{outcome="dropped"}`).
    #[arg(long, default_value_t = 16384)]
    pub access_log_queue: usize,
    /// Export trace spans over OTLP/gRPC to this collector
    /// (`http://host:4317`); no tracing without it.
    #[arg(long, env = "LACEWING_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The share of requests without a `traceparent` that start a trace
    /// (0 to 1); a request whose `traceparent` is sampled is always traced.
    #[arg(long, env = "LACEWING_TRACE_SAMPLING", default_value_t = 0.01, value_parser = sampling)]
    pub trace_sampling: f64,
    /// Spans waiting to be exported at most; more are dropped and counted.
    #[arg(long, default_value_t = 8192)]
    pub trace_queue: usize,
    /// The admin endpoint (config dump, log level, explain): loopback only.
    #[arg(long, env = "LACEWING_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// The daemon's run directory (root only): its handoff socket, through
    /// which a new lacewing-node on this node takes over this one's
    /// listeners in an upgrade. A daemon that starts while another serves
    /// it takes over from that one.
    #[arg(long, env = "LACEWING_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Take over from the lacewing-node running on this node, or fail if
    /// none runs (without it, a daemon with none to take over starts
    /// afresh).
    #[arg(long, env = "LACEWING_TAKEOVER")]
    pub takeover: bool,
    /// A file created once the daemon is ready (it took over, if it was
    /// taking over, and applied its first configuration) and removed when
    /// it drains: the DaemonSet's readiness probe checks it, since every
    /// daemon on a node shares the node's ports.
    #[arg(long, env = "LACEWING_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Test switch: moves the service maps' layout versions this far past
    /// the built-in ones, to exercise an upgrade across a layout change.
    #[arg(long, env = "LACEWING_LAYOUT_BUMP", default_value_t = 0, hide = true)]
    pub layout_bump: u32,
    /// Worker threads that carry the node's connections (1 runs
    /// everything on one thread, with no cross-thread wakeups).
    #[arg(long, env = ENV_WORKERS, default_value_t = DEFAULT_WORKERS)]
    pub workers: usize,
    /// What one peer may hold on the daemon's ports.
    #[command(flatten)]
    pub limits: lacewing_tunnel::limits::LimitFlags,
}

/// Where the handoff socket lives on a node (a hostPath in the chart).
pub const DEFAULT_RUN_DIR: &str = "/run/lacewing";

/// The admin endpoint's address: loopback, as the design says.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";

fn sampling(text: &str) -> Result<f64, String> {
    let share: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!(
            "{share} is not between 0 and 1 (0.01 traces 1% of requests)"
        ))
    }
}

/// Access logs and traces.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    pub access_log_all: bool,
    pub access_log_sink: lacewing_proxy::telemetry::access_log::Sink,
    pub access_log_queue: usize,
    pub otlp_endpoint: Option<String>,
    pub trace_sampling: f64,
    pub trace_queue: usize,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_name: String,
    pub cgroup_root: PathBuf,
    pub daemon_cgroup: Option<PathBuf>,
    pub pod_uid: Option<String>,
    pub bpffs_root: PathBuf,
    pub services_file: Option<PathBuf>,
    pub metrics_addr: SocketAddr,
    pub keep_datapath: bool,
    pub controller: Option<Controller>,
    pub maglev_capacity: u32,
    pub service_cidrs: Vec<ServiceCidr>,
    pub trust_domain: String,
    pub pod_netns_dir: Option<PathBuf>,
    pub cni_socket: Option<PathBuf>,
    pub tunnel_addr: SocketAddr,
    pub bootstrap: Option<Bootstrap>,
    pub acceleration: bool,
    pub fast_path: bool,
    pub drain_timeout: Duration,
    pub certificate_wait: Duration,
    pub telemetry: TelemetryConfig,
    pub admin_addr: SocketAddr,
    pub run_dir: PathBuf,
    pub takeover: bool,
    pub ready_file: Option<PathBuf>,
    pub layout_bump: u32,
    pub limits: lacewing_sys::admission::Limits,
    pub workers: usize,
}

/// Where the node bootstrap (`super::bootstrap`) reads from.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    pub token_file: std::path::PathBuf,
    pub ca_file: std::path::PathBuf,
}

/// How to reach the controller.
#[derive(Clone, Debug)]
pub struct Controller {
    pub url: String,
    pub tls_dir: PathBuf,
    pub server_name: String,
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
    #[error("--controller {0}: the controller speaks mutual TLS only; use https://host:15012")]
    ControllerScheme(String),
    #[error("--services {0}: no such file")]
    NoServicesFile(PathBuf),
    #[error(
        "--admin-addr {0}: the admin endpoint changes the daemon and shows its state; it listens on loopback only (127.0.0.1 or ::1)"
    )]
    AdminNotLoopback(SocketAddr),
    #[error("--otlp-endpoint {0}: give the collector's OTLP/gRPC address as http://host:4317")]
    OtlpScheme(String),
    #[error("--workers {0}: give between 1 and {MAX_WORKERS} worker threads")]
    Workers(usize),
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
        if let Some(url) = &self.controller
            && !url.starts_with("https://")
        {
            return Err(ConfigError::ControllerScheme(url.clone()));
        }
        if let Some(file) = &self.services
            && !file.is_file()
        {
            return Err(ConfigError::NoServicesFile(file.clone()));
        }
        if !self.admin_addr.ip().is_loopback() {
            return Err(ConfigError::AdminNotLoopback(self.admin_addr));
        }
        if let Some(url) = &self.otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::OtlpScheme(url.clone()));
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(ConfigError::Workers(self.workers));
        }
        Ok(NodeConfig {
            workers: self.workers,
            telemetry: TelemetryConfig {
                access_log_all: self.access_log,
                access_log_sink: self.access_log_file,
                access_log_queue: self.access_log_queue,
                otlp_endpoint: self.otlp_endpoint,
                trace_sampling: self.trace_sampling,
                trace_queue: self.trace_queue,
            },
            admin_addr: self.admin_addr,
            run_dir: self.run_dir,
            takeover: self.takeover,
            ready_file: self.ready_file,
            layout_bump: self.layout_bump,
            limits: self.limits.limits(),
            node_name,
            cgroup_root,
            bpffs_root: self.bpffs_root,
            services_file: self.services,
            metrics_addr: self.metrics_addr,
            keep_datapath: self.keep_datapath,
            controller: self.controller.map(|url| Controller {
                url,
                tls_dir: self.tls_dir.unwrap_or_default(),
                server_name: self.controller_server_name,
            }),
            maglev_capacity: self.maglev_capacity,
            service_cidrs: self.service_cidr,
            trust_domain: self.trust_domain,
            pod_netns_dir: self.pod_netns_dir,
            cni_socket: self.cni_socket,
            daemon_cgroup: self.daemon_cgroup,
            pod_uid: self.pod_uid,
            tunnel_addr: self.tunnel_addr,
            acceleration: self.acceleration,
            fast_path: self.fast_path,
            drain_timeout: self.drain_timeout,
            certificate_wait: self.certificate_wait,
            bootstrap: self
                .bootstrap_token_file
                .zip(self.ca_file)
                .map(|(token_file, ca_file)| Bootstrap {
                    token_file,
                    ca_file,
                }),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::NodeArgs::command().debug_assert();
    }

    fn validated(extra: &[&str]) -> Result<super::NodeConfig, String> {
        use clap::Parser as _;
        // One folder per call: tests run in parallel and each removes its own.
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cgroup = std::env::temp_dir().join(format!("lw-config-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), "").unwrap();
        let mut args = vec!["lacewing-node", "--node-name", "n0", "--cgroup-root"];
        let path = cgroup.display().to_string();
        args.push(&path);
        args.extend_from_slice(extra);
        let parsed = super::NodeArgs::try_parse_from(args).map_err(|e| e.to_string())?;
        let out = parsed.validate().map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&cgroup);
        out
    }

    #[test]
    fn telemetry_and_admin_settings_are_checked_and_say_what_to_fix() {
        let c = validated(&[]).unwrap();
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
        assert!(!c.telemetry.access_log_all);
        assert_eq!(c.telemetry.trace_sampling, 0.01);
        assert_eq!(c.telemetry.otlp_endpoint, None);
        let err = validated(&["--admin-addr", "0.0.0.0:15000"]).unwrap_err();
        assert!(err.contains("loopback only"), "{err}");
        let err = validated(&["--otlp-endpoint", "collector:4317"]).unwrap_err();
        assert!(err.contains("http://host:4317"), "{err}");
        let err = validated(&["--trace-sampling", "5"]).unwrap_err();
        assert!(err.contains("not between 0 and 1"), "{err}");
        let c = validated(&[
            "--access-log",
            "--access-log-file",
            "/var/log/x.log",
            "--trace-sampling",
            "1",
        ])
        .unwrap();
        assert!(c.telemetry.access_log_all);
        assert_eq!(
            c.telemetry.access_log_sink,
            lacewing_proxy::telemetry::access_log::Sink::File("/var/log/x.log".into())
        );
    }

    #[test]
    fn workers_default_to_two_and_out_of_range_counts_say_the_bounds() {
        assert_eq!(validated(&[]).unwrap().workers, super::DEFAULT_WORKERS);
        assert_eq!(validated(&["--workers", "1"]).unwrap().workers, 1);
        for bad in ["0", "65"] {
            let err = validated(&["--workers", bad]).unwrap_err();
            assert_eq!(
                err,
                format!("--workers {bad}: give between 1 and 64 worker threads")
            );
        }
    }
}
