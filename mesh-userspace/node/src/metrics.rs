//! The node's Prometheus metrics, served on :15020 `/metrics`.
//!
//! Kernel counters are read from the per-CPU maps at scrape time by a
//! collector (nothing is polled in between); userspace counters are ordinary
//! prometheus-client metrics. Every name starts with `lacewing_`.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
    },
    registry::Registry,
};

use super::lb::LoadBalancer;

/// Labels of a service frontend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `namespace/name:port`.
    pub service: String,
    /// `ClusterIP:port`.
    pub frontend: String,
    pub protocol: String,
}

/// Result of applying a configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// A workload identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// Userspace metrics of the node daemon.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub config_applies: Family<ApplyLabels, Counter>,
    pub certificate_requests: Family<ApplyLabels, Counter>,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    /// Meshed pods whose outbound TCP this node captures now.
    pub captured_pods: Gauge,
}

impl Metrics {
    pub fn new(
        registry: &mut Registry,
        lb: Arc<Mutex<LoadBalancer>>,
        splice: super::maps::SpliceMaps,
    ) -> Self {
        let metrics = Self::default();
        registry.register(
            "lacewing_config_applies",
            "Service configurations applied to the datapath, by result",
            metrics.config_applies.clone(),
        );
        registry.register(
            "lacewing_captured_pods",
            "Meshed pods on this node whose connections the daemon captures now",
            metrics.captured_pods.clone(),
        );
        registry.register(
            "lacewing_certificate_requests",
            "Workload certificate requests to the controller, by result",
            metrics.certificate_requests.clone(),
        );
        registry.register(
            "lacewing_certificate_expiry_timestamp_seconds",
            "When the current certificate of each workload identity on this node expires (Unix time)",
            metrics.certificate_expiry.clone(),
        );
        registry.register_collector(Box::new(KernelCollector { lb, splice }));
        metrics
    }

    pub fn certificate_issued(&self, identity: &str, not_after: u64) {
        self.certificate_requests
            .get_or_create(&ApplyLabels { result: "ok" })
            .inc();
        self.certificate_expiry
            .get_or_create(&IdentityLabels {
                identity: identity.to_owned(),
            })
            .set(i64::try_from(not_after).unwrap_or(i64::MAX));
    }

    pub fn certificate_failed(&self) {
        self.certificate_requests
            .get_or_create(&ApplyLabels { result: "error" })
            .inc();
    }

    /// The identity has no pod on this node any more.
    pub fn certificate_dropped(&self, identity: &str) {
        self.certificate_expiry.remove(&IdentityLabels {
            identity: identity.to_owned(),
        });
    }

    pub fn applied(&self, ok: bool) {
        self.config_applies
            .get_or_create(&ApplyLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }
}

/// Reads the kernel's per-service counters at scrape time.
struct KernelCollector {
    lb: Arc<Mutex<LoadBalancer>>,
    splice: super::maps::SpliceMaps,
}

/// The `leg` label of splice counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LegLabels {
    leg: &'static str,
}

/// Labels of the fast path's decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// `kernel` (decided by the connect hook) or `daemon` (sent to it).
    path: &'static str,
    reason: &'static str,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (stats, services) = {
            let lb = self.lb.lock().unwrap_or_else(|p| p.into_inner());
            match lb.stats() {
                Ok(stats) => (stats, lb.service_count()),
                Err(err) => {
                    tracing::warn!(%err, "reading kernel counters for /metrics");
                    (Vec::new(), lb.service_count())
                }
            }
        };
        let rows: Vec<(ServiceLabels, _)> = stats
            .into_iter()
            .map(|s| {
                let labels = ServiceLabels {
                    service: s.name.clone(),
                    frontend: s.frontend.to_string(),
                    protocol: s.protocol.to_string(),
                };
                (labels, s)
            })
            .collect();
        let gauge = ConstGauge::new(services as i64);
        gauge.encode(encoder.encode_descriptor(
            "lacewing_services",
            "Service frontends installed in the kernel",
            None,
            gauge.metric_type(),
        )?)?;
        for (name, help, pick) in [
            (
                "lacewing_service_connections",
                "Connects (and unconnected UDP sends) the kernel sent to a backend, by service",
                (|s: &super::lb::ServiceStats| s.stats.connects)
                    as fn(&super::lb::ServiceStats) -> u64,
            ),
            (
                "lacewing_service_refused",
                "Connects the kernel refused because the service had no ready backend",
                |s: &super::lb::ServiceStats| s.stats.refused,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (labels, s) in &rows {
                ConstCounter::new(pick(s)).encode(family.encode_family(labels)?)?;
            }
        }
        let mut backends = encoder.encode_descriptor(
            "lacewing_service_backends",
            "Ready backends of each service",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (labels, s) in &rows {
            ConstGauge::new(s.backends as i64).encode(backends.encode_family(labels)?)?;
        }
        self.encode_splice(&mut encoder)
    }
}

impl KernelCollector {
    fn encode_splice(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, on) in [
            (
                "lacewing_acceleration_enabled",
                "1 when same-node acceleration (sockmap splicing of local hops) is on",
                self.splice.acceleration(),
            ),
            (
                "lacewing_fast_path_enabled",
                "1 when the kernel fast path (same-node pod to pod, no daemon hop) is switched on; it also needs acceleration",
                self.splice.fast_path(),
            ),
        ] {
            let gauge = ConstGauge::new(i64::from(on.unwrap_or(false)));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        // No gauge of the sockets spliced now: counting them walks both
        // sockhashes, a syscall per entry, on the daemon's only thread.
        // `lacewing acceleration` and bpftool show it on demand.
        match self.splice.added() {
            Ok(rows) => {
                let mut family = encoder.encode_descriptor(
                    "lacewing_splice_sockets_added",
                    "Sockets added to the splice sockhash, by leg (capture: app and in-pod listener; delivery: daemon and pod here; map_full: refused)",
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?;
                for (leg, n) in rows {
                    ConstCounter::new(n).encode(family.encode_family(&LegLabels { leg })?)?;
                }
            }
            Err(err) => tracing::warn!(%err, "reading splice counters for /metrics"),
        }
        match self.splice.decisions() {
            Ok(rows) => {
                let mut family = encoder.encode_descriptor(
                    "lacewing_fast_path_decisions",
                    "Meshed pods' connects by where the kernel sent them (kernel: straight to a pod here, or refused; daemon: through the node daemon) and why",
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?;
                for (path, reason, n) in rows {
                    ConstCounter::new(n)
                        .encode(family.encode_family(&DecisionLabels { path, reason })?)?;
                }
            }
            Err(err) => tracing::warn!(%err, "reading fast path counters for /metrics"),
        }
        Ok(())
    }
}

/// The proxy's live connections, read from its registry at scrape time.
pub fn register_connections(
    registry: &mut Registry,
    connections: Arc<lacewing_proxy::registry::Registry>,
) {
    registry.register_collector(Box::new(ConnectionsCollector(connections)));
}

#[derive(Debug)]
struct ConnectionsCollector(Arc<lacewing_proxy::registry::Registry>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

impl Collector for ConnectionsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let open = ConstGauge::new(i64::try_from(self.0.len()).unwrap_or(i64::MAX));
        open.encode(encoder.encode_descriptor(
            "lacewing_connections_open",
            "Connections the daemon carries now (a drain waits for them)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?)?;
        let mut opened = encoder.encode_descriptor(
            "lacewing_connections_opened",
            "Connections the daemon has carried, by direction (inbound: delivered to a pod here)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for direction in lacewing_proxy::registry::Direction::ALL {
            ConstCounter::new(self.0.opened(direction)).encode(opened.encode_family(
                &DirectionLabels {
                    direction: direction.label(),
                },
            )?)?;
        }
        Ok(())
    }
}
