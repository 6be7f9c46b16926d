//! The controller's metrics on :15014, read from the node registry at scrape
//! time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
    registry::Registry,
};

use super::grpc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

pub fn register(registry: &mut Registry, nodes: Arc<grpc::Registry>) {
    registry.register(
        "lacewing_controller_subscriptions_refused",
        "Node subscriptions the controller refused, by reason",
        nodes.refused.clone(),
    );
    registry.register_collector(Box::new(NodesCollector(nodes)));
}

struct NodesCollector(Arc<grpc::Registry>);

impl std::fmt::Debug for NodesCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodesCollector")
    }
}

impl Collector for NodesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.0.status();
        let version = ConstGauge::new(status.version as i64);
        version.encode(encoder.encode_descriptor(
            "lacewing_controller_config_version",
            "The configuration version of the source",
            None,
            MetricType::Gauge,
        )?)?;
        let mut applied = encoder.encode_descriptor(
            "lacewing_controller_node_applied_version",
            "The configuration version each node applied",
            None,
            MetricType::Gauge,
        )?;
        for n in &status.nodes {
            ConstGauge::new(n.applied_version as i64).encode(applied.encode_family(
                &NodeLabels {
                    node: n.node.clone(),
                },
            )?)?;
        }
        let mut connected = encoder.encode_descriptor(
            "lacewing_controller_node_connected",
            "Whether the node's configuration stream is open",
            None,
            MetricType::Gauge,
        )?;
        for n in &status.nodes {
            ConstGauge::new(i64::from(n.connected)).encode(connected.encode_family(
                &NodeLabels {
                    node: n.node.clone(),
                },
            )?)?;
        }
        Ok(())
    }
}
