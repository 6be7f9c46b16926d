//! What operators see, with real parts: a real Prometheus scraping both
//! node daemons and the controller, `lacewing top` against a running
//! h2load, access logs switched on by the MeshConfig, spans received by a
//! real OpenTelemetry collector (rotel), and `lacewing explain` on the
//! cases users ask about.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)
//!   n0-p0 client (sa client)                n0-p1 plain (namespace default)
//!   n1-p0 web-0: httpd.py 8080 "web-0"      n1-p1 web-1: httpd.py 8080 "web-1"
//!   Service front 10.96.0.32:80 -> both, HTTPRoute shop/front
//! ```

use std::{process::Command, time::Duration};

use lacewing::lab::{CONTROLLER_IP, Lab, LabProcess, NodeSpec};
use lacewing_tests::{
    bin, h2load_all_succeed,
    mesh_lab::{MeshLab, poll},
    run_in,
};

const HTTP_PORT: u16 = 8080;
const FRONT: &str = "10.96.0.32";
const ROUTE: &str = "shop/front";

fn service(name: &str, ip: &str, endpoints: &[String], port: u16) -> String {
    let addresses: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-v4, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints: [{}]\n",
        if addresses.is_empty() {
            String::new()
        } else {
            format!("{{addresses: [{}]}}", addresses.join(", "))
        }
    )
}

const HTTPROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: front, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: front, port: 80}]
  rules:
  - backendRefs: [{name: front, port: 80}]
";

fn ip(m: &MeshLab, pod: &str) -> String {
    m.lab.pod(pod).unwrap().ip4().to_string()
}

/// httpd.py on both web pods, Service front over them with HTTPRoute
/// shop/front; returns once n0 routes requests to it.
fn front(m: &MeshLab) -> Vec<LabProcess> {
    let servers = vec![
        m.serve_tool("n1-p0", "httpd.py", &["8080", "web-0"], HTTP_PORT),
        m.serve_tool("n1-p1", "httpd.py", &["8080", "web-1"], HTTP_PORT),
    ];
    m.config(
        "front.yaml",
        Some(&format!(
            "{}---\n{HTTPROUTE}",
            service("front", FRONT, &[ip(m, "n1-p0"), ip(m, "n1-p1")], HTTP_PORT)
        )),
    );
    m.until("n0 routes shop/front", || {
        m.routes_listing("n0").contains("shop/front#0")
    });
    servers
}

fn curl(m: &MeshLab, pod: &str, args: &[&str]) -> String {
    let out = run_in(&m.lab, &m.lab.pod(pod).unwrap(), "curl", args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status of a `method` request to `url` from n0-p0 (shop/client).
fn status(m: &MeshLab, method: &str, url: &str) -> String {
    curl(
        m,
        "n0-p0",
        &[
            "-sS",
            "--max-time",
            "5",
            "-X",
            method,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ],
    )
}

/// An AuthorizationPolicy that denies DELETE to shop's pods: an L7 rule,
/// so their node reads each request.
const NO_DELETE: &str = "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: shop}\nspec: {action: Deny, rules: [{to: [{methods: [DELETE]}]}]}\n";

fn access_log(lab: &Lab, node: &str) -> std::path::PathBuf {
    lab.state_dir().join(format!("{node}-access.log"))
}

/// The JSON lines of `node`'s access log that `keep` keeps.
fn lines(
    lab: &Lab,
    node: &str,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    std::fs::read_to_string(access_log(lab, node))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| keep(v))
        .collect()
}

#[test]
fn access_logs_switched_on_by_the_mesh_config_give_one_line_per_request() {
    let m = MeshLab::build_with(&[], true, &|lab: &Lab, node: &NodeSpec| {
        vec![
            "--access-log-file".into(),
            access_log(lab, &node.name()).display().to_string(),
        ]
    });
    let _servers = front(&m);
    // Off by default: a request before the MeshConfig leaves no line
    // (checked at the end, long after its line would have been written).
    assert!(
        curl(
            &m,
            "n0-p0",
            &[
                "-sS",
                "--max-time",
                "5",
                &format!("http://{FRONT}/before-logging")
            ]
        )
        .contains("web-")
    );
    m.config(
        "meshconfig.yaml",
        Some(
            "apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {mtlsMode: Permissive, namespaces: [{namespace: shop, accessLogging: true}]}\n",
        ),
    );
    m.config("authz.yaml", Some(NO_DELETE));
    let outbound = |v: &serde_json::Value| {
        v["kind"] == "request" && v["direction"] == "outbound" && v["route"] == ROUTE
    };
    m.until("n0 logs shop's requests", || {
        curl(
            &m,
            "n0-p0",
            &["-sS", "--max-time", "5", &format!("http://{FRONT}/")],
        );
        !lines(&m.lab, "n0", outbound).is_empty()
    });
    assert!(
        lines(&m.lab, "n0", |_| true)
            .iter()
            .all(|v| v["source_namespace"] == "shop"),
        "only shop's pods are logged"
    );
    let before = lines(&m.lab, "n0", outbound).len();
    h2load_all_succeed(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        1000,
        &["--h1", "-c", "2", &format!("http://{FRONT}/items")],
    );
    let logged = poll("n0 writes 1,000 lines", Duration::from_secs(10), || {
        let all = lines(&m.lab, "n0", outbound);
        (all.len() >= before + 1000).then_some(all)
    });
    assert_eq!(logged.len(), before + 1000, "one line per request");
    let last = logged.last().unwrap();
    assert_eq!(
        last["source_identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(last["source_workload"], "client");
    assert_eq!(last["destination_service"], "shop/front");
    assert_eq!(last["method"], "GET");
    assert_eq!(last["path"], "/items");
    assert_eq!(last["status"], 200);
    assert_eq!(last["protocol"], "http/1.1");
    assert_eq!(last["retries"], 0);
    let backend = last["backend"].as_str().unwrap();
    assert!(
        [ip(&m, "n1-p0"), ip(&m, "n1-p1")]
            .iter()
            .any(|p| backend == format!("{p}:{HTTP_PORT}")),
        "{last}"
    );
    // The destination decides each request (an L7 policy selects the web
    // pods) and logs it with the peer's proven identity; a DELETE is
    // refused, and its line names the policy.
    assert_eq!(
        status(&m, "DELETE", &format!("http://{FRONT}/items/1")),
        "403"
    );
    let denied = poll(
        "n1 logs the refused DELETE",
        Duration::from_secs(10),
        || {
            lines(&m.lab, "n1", |v| {
                v["method"] == "DELETE" && v["direction"] == "inbound"
            })
            .pop()
        },
    );
    assert_eq!(denied["status"], 403, "{denied}");
    assert_eq!(denied["reason"], "policy_denied", "{denied}");
    assert_eq!(denied["policy"], "shop/no-delete", "{denied}");
    assert_eq!(
        denied["source_identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(denied["destination_namespace"], "shop");
    // A flood: every request is answered; each of its lines is written or
    // counted as dropped (the writer never holds a request up).
    let counted = |m: &MeshLab| {
        m.metric("n0", "lacewing_access_log_lines_total{outcome=\"written\"}")
            + m.metric("n0", "lacewing_access_log_lines_total{outcome=\"dropped\"}")
    };
    let before = counted(&m);
    h2load_all_succeed(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        5000,
        &["--h1", "-c", "8", &format!("http://{FRONT}/items")],
    );
    poll(
        "n0 counts a line for each of 5,000 requests",
        Duration::from_secs(10),
        || (counted(&m) - before >= 5000.0).then_some(()),
    );
    assert_eq!(counted(&m) - before, 5000.0);
    for node in ["n0", "n1"] {
        assert!(
            lines(&m.lab, node, |v| v["path"] == "/before-logging").is_empty(),
            "{node} logged a request made before logging was switched on"
        );
    }
}

/// rotel, the collector, on the underlay at `CONTROLLER_IP:4317`, logging
/// every span it receives to `log`.
fn collector(lab: &Lab, log: &std::path::Path) -> LabProcess {
    let mut cmd = Command::new(lacewing_tests::workspace_file(
        lacewing_tests::OTEL_COLLECTOR,
    ));
    cmd.args([
        "start",
        "--otlp-grpc-endpoint",
        &format!("{CONTROLLER_IP}:4317"),
        "--otlp-http-endpoint",
        &format!("{CONTROLLER_IP}:4318"),
        "--exporter",
        "blackhole",
        "--debug-log",
        "traces",
        "--debug-log-verbosity",
        "detailed",
    ])
    .stdout(std::fs::File::create(log).unwrap())
    .stderr(std::fs::File::create(log.with_extension("err")).unwrap());
    let mut c = lab.spawn_on_underlay(cmd).unwrap();
    c.wait_listening(4317, Duration::from_secs(10)).unwrap();
    c
}

#[test]
fn spans_from_both_daemons_reach_a_real_collector_in_one_trace() {
    let m = MeshLab::build_with(&[], true, &|_: &Lab, _: &NodeSpec| {
        vec![
            "--otlp-endpoint".into(),
            format!("http://{CONTROLLER_IP}:4317"),
            // Only requests that come with a sampled traceparent.
            "--trace-sampling".into(),
            "0".into(),
        ]
    });
    let log = m.lab.state_dir().join("collector.log");
    let mut rotel = collector(&m.lab, &log);
    let _servers = front(&m);
    // The destination reads requests (an L7 policy selects the web pods):
    // it has a span of its own.
    m.config("authz.yaml", Some(NO_DELETE));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("traceparent: 00-{trace}-{client_span}-01");
    m.until("the web pods' node reads requests", || {
        status(&m, "DELETE", &format!("http://{FRONT}/x")) == "403"
    });
    // The server sees the node's span as its parent: the trace goes on.
    let echoed = curl(
        &m,
        "n0-p0",
        &[
            "-sS",
            "--max-time",
            "5",
            "-H",
            &traceparent,
            &format!("http://{FRONT}/echo-headers"),
        ],
    );
    let spans = poll(
        "the collector has the trace's two spans",
        Duration::from_secs(15),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let spans = lacewing_tests::otel::spans(&text, trace);
            (spans.len() >= 2).then_some(spans)
        },
    );
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let outbound = spans
        .iter()
        .find(|s| s.attribute("lacewing.direction") == Some("outbound"))
        .expect("n0's span");
    let inbound = spans
        .iter()
        .find(|s| s.attribute("lacewing.direction") == Some("inbound"))
        .expect("n1's span");
    assert_eq!(
        outbound.parent, client_span,
        "n0's span is the client's child"
    );
    assert_eq!(inbound.parent, outbound.id, "n1's span is n0's child");
    assert_eq!(outbound.attribute("lacewing.route"), Some(ROUTE));
    assert_eq!(outbound.attribute("http.response.status_code"), Some("200"));
    assert_eq!(inbound.attribute("http.response.status_code"), Some("200"));
    assert_eq!(outbound.attribute("k8s.node.name"), Some("n0"));
    assert_eq!(inbound.attribute("k8s.node.name"), Some("n1"));
    assert!(
        echoed.contains(&format!("00-{trace}-{}-01", inbound.id)),
        "the pod's request carries n1's span as its parent: {echoed}"
    );
    // With the collector down, requests are answered as before and the
    // spans are counted as dropped.
    rotel.terminate(Duration::from_secs(5)).unwrap();
    let dropped = "lacewing_trace_spans_total{outcome=\"dropped\"}";
    let before = m.metric("n0", dropped);
    for _ in 0..5 {
        assert!(
            curl(
                &m,
                "n0-p0",
                &[
                    "-sS",
                    "--max-time",
                    "5",
                    "-H",
                    &traceparent,
                    &format!("http://{FRONT}/")
                ]
            )
            .contains("web-")
        );
    }
    poll("n0 counts 5 dropped spans", Duration::from_secs(20), || {
        (m.metric("n0", dropped) - before >= 5.0).then_some(())
    });
}

/// Prometheus on the lab's underlay scraping both node daemons and the
/// controller every second, with the mesh's alerting rules loaded.
fn prometheus(m: &MeshLab) -> LabProcess {
    let dir = m.lab.state_dir().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let nodes: Vec<String> = m
        .lab
        .topology()
        .nodes()
        .map(|n| format!("\"{}:15020\"", n.underlay_ip4()))
        .collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{}\"]\nscrape_configs:\n- job_name: lacewing-node\n  static_configs: [{{targets: [{}]}}]\n- job_name: lacewing-controller\n  static_configs: [{{targets: [\"{CONTROLLER_IP}:15014\"]}}]\n",
        lacewing_tests::workspace_file("deploy/alerts/lacewing-rules.yaml").display(),
        nodes.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.join("data").display()
    ))
    .arg("--web.listen-address=127.0.0.1:9090")
    .stdout(std::fs::File::create(dir.join("log")).unwrap())
    .stderr(std::fs::File::create(dir.join("err")).unwrap());
    let mut p = m.lab.spawn_on_underlay(cmd).unwrap();
    p.wait_listening(9090, Duration::from_secs(30)).unwrap();
    p
}

/// A PromQL query over Prometheus' HTTP API (at `at`, Unix seconds, when
/// given): the first result's value.
fn promql(m: &MeshLab, query: &str, at: Option<f64>) -> Option<f64> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:9090/api/v1/query",
        "--data-urlencode",
    ])
    .arg(format!("query={query}"));
    if let Some(at) = at {
        cmd.args(["--data-urlencode", &format!("time={at:.3}")]);
    }
    let out = m.lab.run_on_underlay(cmd).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    assert_eq!(json["status"], "success", "{query}: {json}");
    json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A figure of h2load's summary (`finished in 15.00s, 100.00 req/s`...).
fn h2load_figure(text: &str, after: &str) -> f64 {
    let rest = &text[text
        .find(after)
        .unwrap_or_else(|| panic!("no `{after}` in {text}"))
        + after.len()..];
    rest.trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure after `{after}` in {text}"))
}

#[test]
fn prometheus_and_lacewing_top_see_the_rate_h2load_sends() {
    let m = MeshLab::new();
    let _servers = front(&m);
    let _prometheus = prometheus(&m);
    poll(
        "Prometheus scrapes both nodes and the controller",
        Duration::from_secs(20),
        || (promql(&m, "sum(up)", None) == Some(3.0)).then_some(()),
    );
    let rules = {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "http://127.0.0.1:9090/api/v1/rules"]);
        String::from_utf8_lossy(&m.lab.run_on_underlay(cmd).unwrap().stdout).into_owned()
    };
    assert!(
        rules.contains("LacewingHighErrorRate") && !rules.contains("\"health\":\"err\""),
        "{rules}"
    );
    let series = format!("lacewing_requests_total{{direction=\"outbound\",route=\"{ROUTE}\"}}");
    // The same series in n0's exposition (by the start of its lines).
    let exposed = "lacewing_requests_total{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/front\"";
    let before = m.metric("n0", exposed);
    let buckets_before = route_buckets(&m);
    // 2 connections at 50 requests/s each for 15 s.
    let mut cmd = Command::new("h2load");
    cmd.args([
        "--h1",
        "-c",
        "2",
        "--rps",
        "50",
        "-D",
        "15",
        &format!("http://{FRONT}/items"),
    ])
    .stdout(std::process::Stdio::piped());
    let started = now();
    let h2load = m
        .lab
        .spawn_in_pod(&m.lab.pod("n0-p0").unwrap(), cmd)
        .unwrap();
    poll("h2load's requests flow", Duration::from_secs(10), || {
        (m.metric("n0", exposed) > before + 50.0).then_some(())
    });
    let top = {
        let mut cmd = Command::new(bin("lacewing"));
        cmd.args([
            "top",
            "--once",
            "--output",
            "json",
            "--interval",
            "4s",
            "--lab",
            &m.lab.id().to_string(),
        ]);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "lacewing top: {out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let out = h2load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(" 0 failed, 0 errored, 0 timeout"), "{text}");
    let sent_rate = h2load_figure(&text, "s, ");
    let sent = h2load_figure(&text, "requests: ");
    let row = top["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["direction"] == "outbound" && r["route"] == ROUTE)
        .unwrap_or_else(|| panic!("no row for {ROUTE}: {top}"))
        .clone();
    let top_rate = row["requests_per_second"].as_f64().unwrap();
    assert!(
        (top_rate / sent_rate - 1.0).abs() <= 0.10,
        "lacewing top: {top_rate} requests/s, h2load sent {sent_rate}/s: {top}"
    );
    assert_eq!(row["source"], "shop/client");
    assert_eq!(row["destination"], "shop/front");
    assert_eq!(row["success_rate"], 1.0);
    // Prometheus' rate over 8 s well inside the run, and the count once
    // it has scraped the end.
    let rate = promql(
        &m,
        &format!("sum(rate({series}[8s]))"),
        Some(started + 12.0),
    )
    .expect("a rate");
    assert!(
        (rate / sent_rate - 1.0).abs() <= 0.05,
        "Prometheus: {rate} requests/s, h2load sent {sent_rate}/s"
    );
    eprintln!(
        "measured: h2load {sent_rate} requests/s ({sent} requests), lacewing top {top_rate}/s, Prometheus {rate}/s"
    );
    let total = m.metric("n0", exposed);
    assert_eq!(
        total - before,
        sent,
        "the node counted every request h2load sent"
    );
    poll(
        "Prometheus has scraped the last count",
        Duration::from_secs(10),
        || (promql(&m, &format!("sum({series})"), None) == Some(total)).then_some(()),
    );
    // The p99 by route over the run: Prometheus' from its scrapes, and the
    // one n0's own histogram gives between before and after the run.
    let window = (now() - started + 3.0).ceil();
    let p99 = promql(
        &m,
        &format!("histogram_quantile(0.99, sum by (le) (increase(lacewing_request_duration_seconds_bucket{{direction=\"outbound\",route=\"{ROUTE}\"}}[{window}s])))"),
        None,
    )
    .expect("a p99");
    let own = quantile(&delta(&buckets_before, &route_buckets(&m)), 0.99);
    eprintln!("measured: p99 of {ROUTE}: Prometheus {p99} s, n0's histogram {own} s");
    assert!(
        p99 > 0.0 && (p99 / own - 1.0).abs() <= 0.05,
        "p99: Prometheus {p99} s, n0's histogram {own} s"
    );
}

/// n0's latency buckets of outbound requests by route shop/front, summed
/// over their other labels: upper bound (microseconds; `u64::MAX` for
/// +Inf) -> requests.
fn route_buckets(m: &MeshLab) -> std::collections::BTreeMap<u64, f64> {
    let text = lacewing_tests::node_http(&m.lab, &m.lab.node("n0").unwrap(), "/metrics");
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| {
        l.starts_with("lacewing_request_duration_seconds_bucket{")
            && l.contains("direction=\"outbound\"")
            && l.contains(&format!("route=\"{ROUTE}\""))
    }) {
        let le = line
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        let bound = if le == "+Inf" {
            u64::MAX
        } else {
            (le.parse::<f64>().unwrap() * 1e6).round() as u64
        };
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *out.entry(bound).or_default() += count;
    }
    out
}

fn delta(
    before: &std::collections::BTreeMap<u64, f64>,
    after: &std::collections::BTreeMap<u64, f64>,
) -> std::collections::BTreeMap<u64, f64> {
    after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated within its bucket
/// as Prometheus' `histogram_quantile` does; in seconds.
fn quantile(buckets: &std::collections::BTreeMap<u64, f64>, q: f64) -> f64 {
    let total = buckets[&u64::MAX];
    let rank = q * total;
    let mut lower = (0u64, 0.0);
    for (&bound, &count) in buckets {
        if count >= rank {
            let share = (rank - lower.1) / (count - lower.1);
            return (lower.0 as f64 + (bound - lower.0) as f64 * share) / 1e6;
        }
        lower = (bound, count);
    }
    unreachable!("the +Inf bucket holds every request")
}

/// `lacewing explain` in the lab: verdict and reason, and the exit code.
fn explain(m: &MeshLab, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("lacewing"))
        .arg("explain")
        .args(args)
        .args(["--lab", &m.lab.id().to_string()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("lacewing explain {}\n{text}", args.join(" "));
    (out.status.code().unwrap_or(-1), text)
}

/// `lacewing explain` once its answer contains `marker` (the daemons have
/// the configuration the test just wrote), for at most `limit`.
fn explain_once(
    m: &MeshLab,
    what: &str,
    limit: Duration,
    args: &[&str],
    marker: &str,
) -> (i32, String) {
    poll(what, limit, || {
        let (code, text) = explain(m, args);
        text.contains(marker).then_some((code, text))
    })
}

fn verdict(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.strip_prefix("VERDICT: "))
        .unwrap_or_else(|| panic!("no verdict in:\n{text}"))
}

#[test]
fn lacewing_explain_gives_the_verdict_and_its_reason() {
    let m = MeshLab::new();
    let _servers = front(&m);
    let web0 = ip(&m, "n1-p0");
    let web1 = ip(&m, "n1-p1");
    // The same-node fast path: web-0 to web-1 on n1, no policy.
    let to_web1 = format!("{web1}:{HTTP_PORT}");
    let (code, text) = explain_once(
        &m,
        "n1 has the pair's fast-path verdict",
        Duration::from_secs(10),
        &["shop/web-0", &to_web1],
        "LW_PAIR_POLICY",
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        verdict(&text),
        "ALLOWED: same-node fast path to shop/web-1 (L4 policy allows it on every port)",
        "{text}"
    );
    // STRICT, and a source outside the mesh.
    m.config(
        "meshconfig.yaml",
        Some("apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {mtlsMode: Strict}\n"),
    );
    let to_web0 = format!("{web0}:{HTTP_PORT}");
    let (code, text) = explain_once(
        &m,
        "shop is STRICT",
        Duration::from_secs(10),
        &["default/plain", &to_web0],
        "STRICT",
    );
    assert_eq!(code, 2, "{text}");
    assert_eq!(
        verdict(&text),
        "REFUSED: shop/web-0 is STRICT and the source is not meshed",
        "{text}"
    );
    // Policies: no DELETE (an L7 rule), nothing on port 9000 (L4).
    m.config(
        "authz.yaml",
        Some(&format!(
            "{NO_DELETE}---\n{}",
            "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-9000, namespace: shop}\nspec: {action: Deny, rules: [{to: [{ports: [9000]}]}]}\n"
        )),
    );
    m.config(
        "empty.yaml",
        Some(&service("empty", "10.96.0.50", &[], HTTP_PORT)),
    );
    let front_addr = format!("{FRONT}:80");
    let (code, text) = explain_once(
        &m,
        "n1 has the policies",
        Duration::from_secs(10),
        &[
            "shop/client",
            &front_addr,
            "--method",
            "DELETE",
            "--path",
            "/items/1",
        ],
        "no-delete",
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("HTTPRoute shop/front rule 0"), "{text}");
    assert!(
        text.contains("through the tunnel (HBONE, mutual TLS 1.3) to node n1"),
        "{text}"
    );
    assert!(
        verdict(&text).starts_with("DENIED: by AuthorizationPolicy shop/no-delete"),
        "{text}"
    );
    // The same route, a GET: allowed.
    let (code, text) = explain(
        &m,
        &[
            "shop/client",
            "shop/front:80",
            "--method",
            "GET",
            "--path",
            "/items",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        verdict(&text).starts_with(
            "ALLOWED: GET /items from spiffe://cluster.local/ns/shop/sa/client to shop/web-"
        ),
        "{text}"
    );
    // L4: the web Service's port 9000.
    let (code, text) = explain(
        &m,
        &[
            "shop/client",
            &format!("{}:80", lacewing_tests::mesh_lab::VIP),
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("balanced at connect()"), "{text}");
    assert!(
        verdict(&text).starts_with("DENIED: by AuthorizationPolicy shop/no-9000"),
        "{text}"
    );
    // No ready backend.
    let (code, text) = explain_once(
        &m,
        "n0 has Service empty",
        Duration::from_secs(10),
        &["shop/client", "10.96.0.50:80"],
        "LW_SERVICES 10.96.0.50:80",
    );
    assert_eq!(code, 2, "{text}");
    assert_eq!(
        verdict(&text),
        "REFUSED: Service shop/empty:80 has no ready backend",
        "{text}"
    );
    // An endpoint ejected by outlier detection: web-1 answers 503.
    let _flaky = [
        m.serve_tool("n1-p0", "httpd.py", &["8081", "ok"], 8081),
        m.serve_tool("n1-p1", "httpd.py", &["8081", "broken", "failing"], 8081),
    ];
    m.config(
        "flaky.yaml",
        Some(&format!(
            "{}---\napiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: flaky, namespace: shop}}\nspec:\n  targetRef: {{name: flaky}}\n  loadBalancer: {{algorithm: RoundRobin}}\n  outlierDetection: {{consecutive5xx: 2, interval: 1s, baseEjectionTime: 5m, maxEjectionPercent: 50}}\n",
            service("flaky", "10.96.0.51", &[web0.clone(), web1.clone()], 8081)
        )),
    );
    poll(
        "outlier detection ejects web-1",
        Duration::from_secs(20),
        || {
            curl(
                &m,
                "n0-p0",
                &["-sS", "--max-time", "5", "http://10.96.0.51/"],
            );
            (m.metric("n0", "lacewing_traffic_policy_events_total{destination_service=\"shop/flaky\",event=\"ejection\"}") >= 1.0).then_some(())
        },
    );
    let (code, text) = explain(&m, &["shop/client", "10.96.0.51:80"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("{web1}:8081 (ejected 1x, back in")),
        "{text}"
    );
    assert!(
        text.contains("TrafficPolicy shop/flaky ejected 1 endpoint(s) of shop/flaky"),
        "{text}"
    );
    assert!(verdict(&text).starts_with("ALLOWED"), "{text}");
    assert!(text.contains(&format!("e.g. {web0}:8081")), "{text}");
    // A circuit open: one request in flight to a Service whose breaker
    // allows one.
    let _slow = m.serve_tool("n1-p0", "httpd.py", &["8082", "slow"], 8082);
    m.config(
        "slow.yaml",
        Some(&format!(
            "{}---\napiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: slow, namespace: shop}}\nspec:\n  targetRef: {{name: slow}}\n  circuitBreaker: {{maxRequests: 1}}\n",
            service("slow", "10.96.0.52", std::slice::from_ref(&web0), 8082)
        )),
    );
    poll(
        "n0 routes shop/slow under its breaker",
        Duration::from_secs(10),
        || {
            explain(&m, &["shop/client", "10.96.0.52:80"])
                .1
                .contains("circuit breaker of shop/slow")
                .then_some(())
        },
    );
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "15", "http://10.96.0.52/delay/4000"])
        .stdout(std::process::Stdio::piped());
    let held = m
        .lab
        .spawn_in_pod(&m.lab.pod("n0-p0").unwrap(), cmd)
        .unwrap();
    let (code, text) = explain_once(
        &m,
        "the circuit is full",
        Duration::from_secs(5),
        &["shop/client", "10.96.0.52:80"],
        "VERDICT: REFUSED",
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("1 request(s) in flight (maxRequests 1)"),
        "{text}"
    );
    assert_eq!(
        verdict(&text),
        "REFUSED: circuit open: shop/slow (TrafficPolicy shop/slow) (503 until a request in flight ends)",
        "{text}"
    );
    // What explain says is what a request meets.
    assert_eq!(status(&m, "GET", "http://10.96.0.52/"), "503");
    let out = held.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("slow GET /delay/4000"),
        "{out:?}"
    );
    let (code, text) = explain(&m, &["shop/client", "10.96.0.52:80"]);
    assert_eq!(code, 0, "the request ended, the circuit closed: {text}");
}

#[test]
fn the_admin_endpoint_on_loopback_dumps_the_config_changes_the_log_level_and_explains_on_a_node() {
    let m = MeshLab::new();
    let _servers = front(&m);
    let n0 = m.lab.node("n0").unwrap();
    let admin = |node: &NodeSpec, method: &str, path: &str| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "5",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!(
            "http://127.0.0.1:{}{path}",
            lacewing::lab::ADMIN_PORT
        ));
        let out = m.lab.run_on_node(node, cmd).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dump = admin(&n0, "GET", "/config_dump");
    let (body, status) = dump.rsplit_once('\n').unwrap();
    assert_eq!(status, "200", "{dump}");
    let dump: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(dump["node"], "n0");
    let client = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "client")
        .unwrap_or_else(|| panic!("{dump}"));
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(client["mtls"], "PERMISSIVE");
    let cert = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/shop/sa/client")
        .unwrap_or_else(|| panic!("{dump}"));
    let left = cert["expires_in_s"].as_u64().unwrap();
    assert!(left > 23 * 3600 && left <= 24 * 3600, "{cert}");
    assert!(
        dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["frontend"] == format!("{FRONT}:80")),
        "{dump}"
    );
    // The log filter, changed at run time (shown as the filter prints
    // its directives, most specific first).
    assert_eq!(admin(&n0, "GET", "/logging"), "info\n\n200");
    let set = admin(&n0, "POST", "/logging?level=info,lacewing_proxy%3Ddebug");
    assert_eq!(set, "lacewing_proxy=debug,info\n\n200");
    assert_eq!(admin(&n0, "GET", "/logging"), set);
    let bad = admin(&n0, "POST", "/logging?level=loud%3D%3D");
    assert!(
        bad.ends_with("400") && bad.contains("is not a log filter"),
        "{bad}"
    );
    assert_eq!(
        admin(&n0, "GET", "/logging"),
        set,
        "a bad filter changes nothing"
    );
    // Loopback only: not from the underlay.
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "2"]).arg(format!(
        "http://{}:{}/config_dump",
        n0.underlay_ip4(),
        lacewing::lab::ADMIN_PORT
    ));
    let out = m.lab.run_on_underlay(cmd).unwrap();
    assert!(
        !out.status.success(),
        "the admin endpoint answered from the underlay"
    );
    // `lacewing explain` on a node: its own daemon answers its side, and
    // says which node holds the rest.
    let on = |node: &NodeSpec, args: &[&str]| {
        let mut cmd = Command::new(bin("lacewing"));
        cmd.arg("explain").args(args);
        let out = m.lab.run_on_node(node, cmd).unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = on(&n0, &["shop/client", &format!("{FRONT}:80")]);
    assert_eq!(code, Some(3), "{text}");
    let hint = verdict(&text);
    assert!(hint.starts_with("UNDECIDED: the destination's side is decided on n1: run `lacewing explain 10.244.0.10 10.244.1."), "{text}");
    let rerun: Vec<&str> = hint
        .split('`')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .skip(2)
        .collect();
    let (code, text) = on(&m.lab.node("n1").unwrap(), &rerun);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        verdict(&text)
            .starts_with("ALLOWED: from spiffe://cluster.local/ns/shop/sa/client to shop/web-"),
        "{text}"
    );
}
