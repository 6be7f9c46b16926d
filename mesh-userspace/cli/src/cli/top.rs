//! `lacewing top` and `lacewing stat`: live request rate, success rate and
//! latency per workload and route (as `linkerd viz top/stat`), with each
//! node's open connections and tunnel bytes, from the node daemons'
//! `/metrics` read twice an interval apart. `--output json` for scripts.

use std::{collections::BTreeMap, time::Duration};

use crate::lab::Lab;

/// One scrape of a node: every sample, by name and labels.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// Parses the Prometheus text format (comments skipped).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Self { samples }
    }

    fn sum(&self, name: &str, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && keep(l))
            .map(|(_, _, v)| v)
            .sum()
    }
}

fn parse_line(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (n, v) = line.split_once(' ')?;
            return Some((
                n.to_owned(),
                BTreeMap::new(),
                v.split(' ').next()?.parse().ok()?,
            ));
        }
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            let value = after.trim().split(' ').next()?.parse().ok()?;
            return Some((name.to_owned(), labels, value));
        }
        let (key, after) = rest.split_once("=\"")?;
        // The value ends at the first quote not escaped.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => {
                    let (_, e) = chars.next()?;
                    value.push(match e {
                        'n' => '\n',
                        other => other,
                    });
                }
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &after[end + 1..];
    }
}

/// One row: requests from a source workload to a destination Service by
/// route (outbound), or to a destination workload (inbound).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub node: String,
    pub direction: String,
    pub source: String,
    pub destination: String,
    pub route: String,
    pub requests_per_second: f64,
    /// Share of answers that are no 5xx (and, for gRPC, OK or a client
    /// error), 0 to 1; absent with no request.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One node's connections and tunnel bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeRow {
    pub node: String,
    pub connections_open: f64,
    pub tunnel_bytes_per_second: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Table {
    pub interval_seconds: f64,
    pub rows: Vec<Row>,
    pub nodes: Vec<NodeRow>,
}

const REQUESTS: &str = "lacewing_requests_total";
const BUCKETS: &str = "lacewing_request_duration_seconds_bucket";

type Key = (String, String, String, String);

fn key(l: &BTreeMap<String, String>) -> Key {
    let get = |k: &str| l.get(k).cloned().unwrap_or_default();
    let source = match (get("source_namespace"), get("source_workload")) {
        (ns, w) if w.is_empty() => ns,
        (ns, w) => format!("{ns}/{w}"),
    };
    let destination = match get("direction").as_str() {
        "outbound" => get("destination_service"),
        _ => format!(
            "{}/{}",
            get("destination_namespace"),
            get("destination_workload")
        ),
    };
    (get("direction"), source, destination, get("route"))
}

fn failed(l: &BTreeMap<String, String>) -> bool {
    let code: u16 = l.get("code").and_then(|c| c.parse().ok()).unwrap_or(0);
    // gRPC's server-side failures (UNKNOWN, DEADLINE_EXCEEDED, ...,
    // UNAVAILABLE, DATA_LOSS), as Linkerd counts them.
    let grpc_failed = matches!(
        l.get("grpc_status").map(String::as_str),
        Some("2" | "4" | "12" | "13" | "14" | "15")
    );
    code >= 500 || grpc_failed
}

/// The rows between two scrapes of one node, `seconds` apart.
pub fn rows(node: &str, before: &Scrape, after: &Scrape, seconds: f64) -> (Vec<Row>, NodeRow) {
    let mut totals: BTreeMap<Key, (f64, f64)> = BTreeMap::new();
    let mut buckets: BTreeMap<Key, BTreeMap<u64, f64>> = BTreeMap::new();
    for (name, labels, value) in &after.samples {
        let earlier = |name: &str| {
            before
                .samples
                .iter()
                .find(|(n, l, _)| n == name && l == labels)
                .map_or(0.0, |(_, _, v)| *v)
        };
        if name == REQUESTS {
            let delta = (value - earlier(REQUESTS)).max(0.0);
            let entry = totals.entry(key(labels)).or_default();
            entry.0 += delta;
            if failed(labels) {
                entry.1 += delta;
            }
        } else if name == BUCKETS {
            let le = labels
                .get("le")
                .map_or(f64::INFINITY, |l| l.parse().unwrap_or(f64::INFINITY));
            let delta = (value - earlier(BUCKETS)).max(0.0);
            // Bucket bounds as microseconds, to key them exactly.
            let bound = if le.is_finite() {
                (le * 1e6) as u64
            } else {
                u64::MAX
            };
            *buckets
                .entry(key(labels))
                .or_default()
                .entry(bound)
                .or_default() += delta;
        }
    }
    let rows = totals
        .into_iter()
        .map(|(k, (n, failures))| {
            let b = buckets.remove(&k).unwrap_or_default();
            Row {
                node: node.to_owned(),
                direction: k.0,
                source: k.1,
                destination: k.2,
                route: k.3,
                requests_per_second: n / seconds,
                success_rate: (n > 0.0).then(|| (n - failures) / n),
                p50_ms: quantile(&b, 0.5),
                p99_ms: quantile(&b, 0.99),
            }
        })
        .collect();
    let open = after.sum("lacewing_connections_open", |_| true);
    let bytes = after.sum("lacewing_tunnel_bytes_total", |_| true)
        - before.sum("lacewing_tunnel_bytes_total", |_| true);
    (
        rows,
        NodeRow {
            node: node.to_owned(),
            connections_open: open,
            tunnel_bytes_per_second: bytes.max(0.0) / seconds,
        },
    )
}

/// The `q` quantile of cumulative buckets (upper bound in microseconds ->
/// count), interpolated within its bucket as Prometheus'
/// `histogram_quantile` does; in milliseconds.
fn quantile(buckets: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let total = *buckets.get(&u64::MAX)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0u64, 0.0);
    for (&bound, &count) in buckets {
        if count >= rank {
            if bound == u64::MAX {
                return Some(lower.0 as f64 / 1e3);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                0.0
            };
            return Some((lower.0 as f64 + (bound - lower.0) as f64 * share) / 1e3);
        }
        lower = (bound, count);
    }
    None
}

/// Where the metrics come from.
pub enum Source {
    Lab(Lab),
    /// `host:15020` of node daemons.
    Addrs(Vec<String>),
}

impl Source {
    fn scrape(&self) -> anyhow::Result<Vec<(String, Scrape)>> {
        match self {
            Self::Lab(lab) => lab
                .topology()
                .nodes()
                .map(|n| Ok((n.name(), Scrape::parse(&lab.node_get(&n, "/metrics")?))))
                .collect(),
            Self::Addrs(addrs) => addrs
                .iter()
                .map(|a| {
                    Ok((
                        a.clone(),
                        Scrape::parse(&super::get_text(a, "/metrics", "the node daemon")?),
                    ))
                })
                .collect(),
        }
    }
}

/// One table over `interval`.
pub fn measure(source: &Source, interval: Duration) -> anyhow::Result<Table> {
    let before = source.scrape()?;
    let started = std::time::Instant::now();
    std::thread::sleep(interval);
    let after = source.scrape()?;
    let seconds = started.elapsed().as_secs_f64();
    let mut table = Table {
        interval_seconds: seconds,
        rows: Vec::new(),
        nodes: Vec::new(),
    };
    for (node, later) in &after {
        let earlier = before
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        let (mut rows, node_row) = rows(node, &earlier, later, seconds);
        rows.retain(|r| r.requests_per_second > 0.0);
        table.rows.extend(rows);
        table.nodes.push(node_row);
    }
    table
        .rows
        .sort_by(|a, b| b.requests_per_second.total_cmp(&a.requests_per_second));
    Ok(table)
}

pub fn render(t: &Table) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let mut out = format!(
        "{:<5} {:<9} {:<28} {:<28} {:<20} {:>9} {:>8} {:>8} {:>8}\n",
        "NODE", "DIRECTION", "SOURCE", "DESTINATION", "ROUTE", "RPS", "SUCCESS", "P50_MS", "P99_MS"
    );
    for r in &t.rows {
        out.push_str(&format!(
            "{:<5} {:<9} {:<28} {:<28} {:<20} {:>9.1} {:>8} {:>8} {:>8}\n",
            r.node,
            r.direction,
            r.source,
            r.destination,
            if r.route.is_empty() { "-" } else { &r.route },
            r.requests_per_second,
            r.success_rate
                .map_or("-".to_owned(), |s| format!("{:.2}%", s * 100.0)),
            ms(r.p50_ms),
            ms(r.p99_ms),
        ));
    }
    out.push('\n');
    for n in &t.nodes {
        out.push_str(&format!(
            "node {}: {} connections open, tunnel {:.0} B/s\n",
            n.node, n.connections_open, n.tunnel_bytes_per_second
        ));
    }
    out
}

/// Prints tables every `interval` (once with `once`), as text refreshed in
/// place or as JSON lines.
pub fn run(source: &Source, interval: Duration, once: bool, json: bool) -> anyhow::Result<i32> {
    loop {
        let table = measure(source, interval)?;
        if json {
            println!("{}", serde_json::to_string(&table)?);
        } else {
            if !once {
                // Clear the screen and go home, as `top` does.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&table));
        }
        if once {
            return Ok(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_success_and_quantiles_come_from_the_difference_of_two_scrapes() {
        let labels = |code: &str| {
            format!(
                "direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/web\",destination_workload=\"\",destination_namespace=\"shop\",route=\"shop/split\",code=\"{code}\",grpc_status=\"\",mesh_flag=\"\""
            )
        };
        let before = Scrape::parse(&format!(
            "lacewing_requests_total{{{}}} 100\nlacewing_request_duration_seconds_bucket{{{},le=\"0.001\"}} 50\nlacewing_request_duration_seconds_bucket{{{},le=\"0.005\"}} 100\nlacewing_request_duration_seconds_bucket{{{},le=\"+Inf\"}} 100\n",
            labels("200"),
            labels("200"),
            labels("200"),
            labels("200")
        ));
        let after = Scrape::parse(&format!(
            "lacewing_requests_total{{{}}} 1100\nlacewing_requests_total{{{}}} 10\nlacewing_request_duration_seconds_bucket{{{},le=\"0.001\"}} 550\nlacewing_request_duration_seconds_bucket{{{},le=\"0.005\"}} 1100\nlacewing_request_duration_seconds_bucket{{{},le=\"+Inf\"}} 1100\nlacewing_connections_open{{direction=\"outbound\"}} 3\n",
            labels("200"),
            labels("503"),
            labels("200"),
            labels("200"),
            labels("200")
        ));
        let (rows, node) = rows("n0", &before, &after, 2.0);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.source.as_str(), r.destination.as_str(), r.route.as_str()),
            ("shop/client", "shop/web", "shop/split")
        );
        assert_eq!(r.requests_per_second, 505.0);
        assert_eq!(r.success_rate, Some(1000.0 / 1010.0));
        // 1000 requests: 500 under 1 ms, 500 between 1 and 5 ms.
        assert_eq!(r.p50_ms, Some(1.0));
        assert!((r.p99_ms.unwrap() - 4.92).abs() < 1e-9, "{:?}", r.p99_ms);
        assert_eq!(node.connections_open, 3.0);
    }
}
