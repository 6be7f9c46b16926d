//! TrafficPolicies applied by the client's node, with real HTTP and gRPC
//! servers and clients: retries with a budget and outlier detection around
//! a failing endpoint, a retry storm held to the budget, circuit breaking,
//! fault injection (marked in the metrics), consistent hashing, gRPC
//! statuses, and a policy with a bad value rejected.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)
//!   n0-p0 client (sa client)
//!   n1-p0 web-0, n1-p1 web-1: httpd.py servers on 8080-8084, some failing
//!   Services (port 80, no HTTPRoute): pool 10.96.0.40 (3 endpoints, one
//!   failing), broken .41 (2, both failing), slow .42, faulty .43,
//!   hashed .44 (5 endpoints), items .45 (gRPC, every other Get failing),
//!   steady .47 (gRPC), limited .46
//! ```

use std::time::{Duration, Instant};

use lacewing_tests::{
    bin,
    mesh_lab::{MeshLab, poll},
    node_http, run_in,
};

const POOL: &str = "10.96.0.40";
const BROKEN: &str = "10.96.0.41";
const SLOW: &str = "10.96.0.42";
const FAULTY: &str = "10.96.0.43";
const HASHED: &str = "10.96.0.44";
const ITEMS: &str = "10.96.0.45";
const STEADY: &str = "10.96.0.47";
const GRPC_PORT: u16 = 50061;

/// A Service on port 80 (named `http`) at `ip` whose endpoints are
/// `(pod IP, port)`: one EndpointSlice per target port.
fn service(name: &str, ip: &str, endpoints: &[(&str, u16)]) -> String {
    let mut ports: Vec<u16> = endpoints.iter().map(|(_, p)| *p).collect();
    ports.sort_unstable();
    ports.dedup();
    let mut docs = vec![format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
    )];
    for port in ports {
        let addresses: Vec<String> = endpoints
            .iter()
            .filter(|(_, p)| *p == port)
            .map(|(a, _)| format!("\"{a}\""))
            .collect();
        docs.push(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{port}, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints: [{{addresses: [{}]}}]\n",
            addresses.join(", ")
        ));
    }
    docs.join("---\n")
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {{name: {name}}}\n{spec}"
    )
}

/// httpd.py in `pod` on `port`, answering as `name` (failing: every answer
/// 503 until healed).
fn httpd(
    m: &MeshLab,
    pod: &str,
    port: u16,
    name: &str,
    failing: bool,
) -> lacewing::lab::LabProcess {
    let port_s = port.to_string();
    let mut args = vec![port_s.as_str(), name];
    if failing {
        args.push("failing");
    }
    m.serve_tool(pod, "httpd.py", &args, port)
}

fn count(out: &str, key: &str) -> u32 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map_or(0, |n| n.parse().unwrap())
}

fn ip(m: &MeshLab, pod: &str) -> String {
    m.lab.pod(pod).unwrap().ip4().to_string()
}

/// Waits until n0's daemon routes `service` under its TrafficPolicy.
fn until_policy(m: &MeshLab, service: &str) {
    let want = format!("\"policy\": \"shop/{service}\"");
    m.until(&format!("n0 applies TrafficPolicy shop/{service}"), || {
        node_http(&m.lab, &m.lab.node("n0").unwrap(), "/routes").contains(&want)
    });
}

fn event(m: &MeshLab, service: &str, event: &str) -> f64 {
    m.metric(
        "n0",
        &format!(
            "lacewing_traffic_policy_events_total{{destination_service=\"shop/{service}\",event=\"{event}\"}}"
        ),
    )
}

/// Requests n0 answered for `service` with `code` and `flag`.
fn requests(m: &MeshLab, service: &str, code: u16, flag: &str) -> f64 {
    m.metric(
        "n0",
        &format!("lacewing_requests_total{{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/{service}\",destination_workload=\"\",destination_namespace=\"shop\",route=\"\",code=\"{code}\",grpc_status=\"\",mesh_flag=\"{flag}\"}}"),
    )
}

/// The `x-served` count of the httpd.py at `ip:port`, asked directly (the
/// asking request is not counted).
fn served(m: &MeshLab, ip: &str, port: u16, path: &str) -> u32 {
    let out = run_in(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("http://{ip}:{port}{path}"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let n: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("x-served: "))
        .unwrap_or_else(|| panic!("no x-served in {text:?}"))
        .trim()
        .parse()
        .unwrap();
    n - 1
}

#[test]
fn retries_and_outlier_detection_hide_a_failing_endpoint_and_a_retry_storm_stays_within_budget() {
    let m = MeshLab::new();
    let (web0, web1) = (ip(&m, "n1-p0"), ip(&m, "n1-p1"));
    let _servers = [
        httpd(&m, "n1-p0", 8080, "a", false),
        httpd(&m, "n1-p1", 8080, "b", false),
        httpd(&m, "n1-p0", 8081, "bad", true),
        httpd(&m, "n1-p0", 8082, "down", true),
        httpd(&m, "n1-p1", 8082, "down", true),
    ];
    m.config(
        "services.yaml",
        Some(
            &[
                service("pool", POOL, &[(&web0, 8080), (&web1, 8080), (&web0, 8081)]),
                service("broken", BROKEN, &[(&web0, 8082), (&web1, 8082)]),
            ]
            .join("---\n"),
        ),
    );
    m.until("n0 balances pool", || {
        m.try_run_tool("n0-p0", "hits.py", &[POOL, "80", "/", "1"])
            .is_ok_and(|o| o.contains("connections=1"))
    });

    // No policy: the kernel balances each connection; about one in three
    // lands on the failing endpoint.
    let out = m.run_tool("n0-p0", "hits.py", &["--fresh", POOL, "80", "/x", "300"]);
    let bad = count(&out, "503 bad");
    assert_eq!(
        count(&out, "200 a") + count(&out, "200 b") + bad,
        300,
        "{out}"
    );
    assert!((60..=140).contains(&bad), "about a third fail: {out}");
    let bad_before = served(&m, &web0, 8081, "/__fail");

    // Retries (2, on 5xx, within the default 20% budget) and outlier
    // detection (3 consecutive 5xx eject for 6 s): 1,000 requests on one
    // keep-alive connection. Round robin, so that each endpoint is tried in
    // turn: peak EWMA may avoid the failing endpoint for the whole run once
    // its first answer was slow (a new connection on a busy machine), and
    // it is then not ejected, only avoided.
    m.config(
        "policy.yaml",
        Some(&policy(
            "pool",
            "  retries: {attempts: 2, retryOn: [5xx], backoff: 5ms}\n  outlierDetection: {consecutive5xx: 3, interval: 10s, baseEjectionTime: 6s}\n  loadBalancer: {algorithm: RoundRobin}\n",
        )),
    );
    until_policy(&m, "pool");
    let out = m.run_tool("n0-p0", "hits.py", &[POOL, "80", "/y", "1000"]);
    let ok = count(&out, "200 a") + count(&out, "200 b");
    assert!(ok >= 999, "at least 999 of 1,000 succeed: {out}");
    assert_eq!(count(&out, "connections"), 1, "{out}");
    // Ejected after its third consecutive failure; each time it came back
    // (on probation) one more failure ejected it again.
    let ejections = event(&m, "pool", "ejection");
    assert!(ejections >= 1.0, "ejections: {ejections}");
    let bad_during = served(&m, &web0, 8081, "/__heal") - bad_before - 1;
    assert!(
        f64::from(bad_during) <= 3.0 + (ejections - 1.0),
        "the failing endpoint served {bad_during} requests over {ejections} ejections"
    );
    // `lacewing routes` shows it ejected.
    let listing = m.routes_listing("n0");
    let expected = format!(
        "10.96.0.40:80 (shop/pool:80) TrafficPolicy shop/pool\n  no HTTPRoute [PathPrefix /] clients: all\n    -> shop/pool:80 weight 1, RoundRobin (TrafficPolicy shop/pool): {web0}:8080 {web0}:8081 (ejected "
    );
    assert!(listing.starts_with(&expected), "{listing}");
    assert!(listing.contains(&format!("s) {web1}:8080\n")), "{listing}");
    // Healed, it comes back after its ejection time.
    let back = poll(
        "the healed endpoint answers again",
        Duration::from_secs(30),
        || {
            let out = m.run_tool("n0-p0", "hits.py", &[POOL, "80", "/z", "30"]);
            (count(&out, "200 bad") > 0).then_some(out)
        },
    );
    assert_eq!(count(&back, "503 bad"), 0, "{back}");

    // A retry storm: every endpoint fails, 3 retries allowed per request,
    // but the budget (20%, no floor) allows 100 over 500 requests.
    m.config(
        "broken.yaml",
        Some(&policy(
            "broken",
            "  retries: {attempts: 3, retryOn: [5xx], backoff: 1ms, budget: {percent: 20, minRetriesPerSecond: 0}}\n",
        )),
    );
    until_policy(&m, "broken");
    let retries = || m.metric("n0", "lacewing_request_retries_total{route=\"\"}");
    let before = retries();
    let out = m.run_tool("n0-p0", "hits.py", &[BROKEN, "80", "/", "500"]);
    assert_eq!(count(&out, "503 down"), 500, "{out}");
    let added = retries() - before;
    assert!((90.0..=100.0).contains(&added), "retries added: {added}");
    assert!(event(&m, "broken", "retry_budget_exhausted") >= 390.0);

    // A policy with a bad value is rejected with its file and changes
    // nothing: the storm's policy still applies.
    m.config(
        "broken.yaml",
        Some(&policy(
            "broken",
            "  retries: {attempts: 3, retryOn: [sometimes]}\n",
        )),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let mut cmd = std::process::Command::new(bin("lacewing"));
        cmd.args(["status", "--controller", &m.lab.controller_status_addr()]);
        let out = m.lab.run_on_underlay(cmd).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("broken.yaml") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the bad policy is never rejected:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.contains(
            "TrafficPolicy shop/broken: spec.retries.retryOn: `sometimes` is not one of 5xx"
        ),
        "{status}"
    );
    let before = retries();
    let out = m.run_tool("n0-p0", "hits.py", &[BROKEN, "80", "/", "50"]);
    assert_eq!(count(&out, "503 down"), 50, "{out}");
    assert!(retries() - before <= 10.0, "still within the old budget");
}

/// One request from h2load's log, times in microseconds.
#[derive(Debug, Clone, Copy)]
struct Logged {
    start: u64,
    status: u16,
    took: u64,
}

impl Logged {
    fn end(&self) -> u64 {
        self.start + self.took
    }
}

/// Each request from h2load's log: start (µs since the epoch), status and
/// time to the end of the response.
fn h2load_log(path: &std::path::Path) -> Vec<Logged> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            Logged {
                start: cols[0].parse().unwrap(),
                status: cols[1].parse().unwrap(),
                took: cols[2].parse().unwrap(),
            }
        })
        .collect()
}

/// The most `200` answers the client had outstanding at one moment while
/// `refused` was outstanding. The daemon saw each request inside the span
/// the client logged for it, so when it refused one for being over a limit
/// of `n` in flight, at least `n` of the answered spans overlap the refused
/// one at one moment (the overlap only rises at an answered start).
fn outstanding_during(entries: &[Logged], refused: &Logged) -> usize {
    let ok: Vec<&Logged> = entries.iter().filter(|e| e.status == 200).collect();
    std::iter::once(refused.start)
        .chain(
            ok.iter()
                .map(|e| e.start)
                .filter(|&t| (refused.start..=refused.end()).contains(&t)),
        )
        .map(|t| ok.iter().filter(|e| e.start <= t && t < e.end()).count())
        .max()
        .unwrap_or(0)
}

/// Checks a burst against a limit of `limit` requests in flight: every
/// request was answered 200 or refused 503 well inside the 1 s a request
/// takes, at least `limit` were answered, and each refusal came while
/// `limit` answered ones were outstanding. How many are answered beyond
/// `limit` depends on how fast the client opened its connections (on a busy
/// machine a late one can start after an early one ended), so the test
/// reads the count and asserts the metrics agree with it. Returns the
/// refused count.
fn assert_limited(entries: &[Logged], n: usize, limit: usize) -> usize {
    assert_eq!(entries.len(), n, "{entries:?}");
    let refused: Vec<&Logged> = entries.iter().filter(|e| e.status == 503).collect();
    let ok = entries.iter().filter(|e| e.status == 200).count();
    assert_eq!(ok + refused.len(), n, "only 200s and 503s: {entries:?}");
    assert!(
        ok >= limit,
        "{ok} answered, fewer than {limit}: {entries:?}"
    );
    assert!(!refused.is_empty(), "nothing refused: {entries:?}");
    for r in &refused {
        assert!(
            r.took < 500_000,
            "a refusal took {} µs: {entries:?}",
            r.took
        );
        assert!(
            outstanding_during(entries, r) >= limit,
            "{r:?} was refused with fewer than {limit} in flight: {entries:?}"
        );
    }
    refused.len()
}

/// `n` concurrent requests for 1 s each to [`SLOW`] (h2load, one HTTP/1.1
/// connection each): every request's status and duration.
fn burst(m: &MeshLab, log: &str, n: u32) -> Vec<Logged> {
    let log = m.lab.state_dir().join(log);
    let n = n.to_string();
    let out = run_in(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        "h2load",
        &[
            "--h1",
            "-n",
            &n,
            "-c",
            &n,
            "--log-file",
            log.to_str().unwrap(),
            &format!("http://{SLOW}/delay/1000"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let entries = h2load_log(&log);
    assert_eq!(entries.len().to_string(), n, "{entries:?}");
    entries
}

/// curl's total time for one request to `url`, in seconds.
fn seconds(m: &MeshLab, url: &str) -> f64 {
    let out = run_in(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}",
            url,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn a_circuit_breaker_fails_fast_and_injected_faults_are_marked() {
    let m = MeshLab::new();
    let web1 = ip(&m, "n1-p1");
    let _server = httpd(&m, "n1-p1", 8080, "s", false);
    m.config(
        "services.yaml",
        Some(
            &[
                service("slow", SLOW, &[(&web1, 8080)]),
                service("faulty", FAULTY, &[(&web1, 8080)]),
            ]
            .join("---\n"),
        ),
    );
    m.until("n0 balances faulty", || {
        m.try_run_tool("n0-p0", "hits.py", &[FAULTY, "80", "/", "1"])
            .is_ok_and(|o| o.contains("200 s=1"))
    });
    let baseline = median(
        (0..5)
            .map(|_| seconds(&m, &format!("http://{FAULTY}/")))
            .collect(),
    );

    // 50 concurrent requests that take 1 s, 10 allowed in flight: the rest
    // are refused at once (40 when the client opens its connections
    // together, as it does on an idle machine).
    m.config(
        "slow.yaml",
        Some(&policy("slow", "  circuitBreaker: {maxRequests: 10}\n")),
    );
    until_policy(&m, "slow");
    let entries = burst(&m, "breaker.log", 50);
    let open = assert_limited(&entries, 50, 10);
    assert_eq!(event(&m, "slow", "circuit_open"), open as f64);
    assert_eq!(requests(&m, "slow", 503, "circuit_open"), open as f64);

    // HTTP/1.1 connections: 2 in use, 3 requests may wait for one; of 10
    // concurrent 1 s requests, 2 go at once, 3 wait their turn, the rest
    // (5 on an idle machine) are refused at once.
    let before = controller_version(&m);
    m.config(
        "slow.yaml",
        Some(&policy(
            "slow",
            "  circuitBreaker: {maxConnections: 2, maxPendingRequests: 3}\n",
        )),
    );
    until_in_sync(&m, before);
    let entries = burst(&m, "queue.log", 10);
    let queued_open = assert_limited(&entries, 10, 5);
    // Two connections serve one 1 s request at a time each, so the k-th
    // answer ends at least ceil(k/2) s after the first request started:
    // the third to fifth waited their turn.
    let first = entries.iter().map(|e| e.start).min().unwrap();
    let mut ends: Vec<u64> = entries
        .iter()
        .filter(|e| e.status == 200)
        .map(Logged::end)
        .collect();
    ends.sort_unstable();
    for (k, end) in ends.iter().enumerate() {
        let turns = k as u64 / 2 + 1;
        assert!(
            end - first >= turns * 1_000_000,
            "answer {} ended {} µs after the first start: {entries:?}",
            k + 1,
            end - first
        );
    }
    assert_eq!(
        event(&m, "slow", "circuit_open"),
        (open + queued_open) as f64
    );

    // Abort half the requests with 503: counted apart from real failures.
    m.config(
        "faulty.yaml",
        Some(&policy(
            "faulty",
            "  fault: {abort: {percent: 50, httpStatus: 503}}\n",
        )),
    );
    until_policy(&m, "faulty");
    let out = m.run_tool("n0-p0", "hits.py", &[FAULTY, "80", "/", "1000"]);
    let aborted = count(&out, "503 fault_abort");
    assert_eq!(aborted + count(&out, "200 s"), 1000, "{out}");
    assert!((450..=550).contains(&aborted), "{out}");
    assert_eq!(event(&m, "faulty", "fault_abort"), f64::from(aborted));
    assert_eq!(
        requests(&m, "faulty", 503, "fault_abort"),
        f64::from(aborted)
    );
    assert_eq!(requests(&m, "faulty", 503, ""), 0.0);

    // Delay every request by 200 ms.
    m.config(
        "faulty.yaml",
        Some(&policy(
            "faulty",
            "  fault: {delay: {percent: 100, fixedDelay: 200ms}}\n",
        )),
    );
    m.until("the delay applies", || {
        seconds(&m, &format!("http://{FAULTY}/")) > 0.15
    });
    let delayed = median(
        (0..5)
            .map(|_| seconds(&m, &format!("http://{FAULTY}/")))
            .collect(),
    );
    let added = delayed - baseline;
    assert!(
        (0.180..=0.220).contains(&added),
        "added {added} s (baseline {baseline} s)"
    );
    assert!(requests(&m, "faulty", 200, "fault_delay") >= 5.0);
}

#[test]
fn consistent_hashing_keeps_keys_and_grpc_clients_get_grpc_statuses() {
    let m = MeshLab::new();
    let (web0, web1) = (ip(&m, "n1-p0"), ip(&m, "n1-p1"));
    let _servers = [
        httpd(&m, "n1-p0", 8080, "h0", false),
        httpd(&m, "n1-p0", 8081, "h1", false),
        httpd(&m, "n1-p0", 8082, "h2", false),
        httpd(&m, "n1-p1", 8080, "h3", false),
        httpd(&m, "n1-p1", 8081, "h4", false),
    ];
    let _grpc = m.serve_tool(
        "n1-p1",
        "grpcsvc.py",
        &["serve", &GRPC_PORT.to_string(), "flaky"],
        GRPC_PORT,
    );
    let _steady = m.serve_tool(
        "n1-p0",
        "grpcsvc.py",
        &["serve", &GRPC_PORT.to_string()],
        GRPC_PORT,
    );
    let five = [
        (web0.as_str(), 8080),
        (web0.as_str(), 8081),
        (web0.as_str(), 8082),
        (web1.as_str(), 8080),
        (web1.as_str(), 8081),
    ];
    let items = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: items, namespace: shop}}\nspec: {{clusterIP: {ITEMS}, ports: [{{name: grpc, port: {GRPC_PORT}, appProtocol: grpc}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: items-v4, namespace: shop, labels: {{kubernetes.io/service-name: items}}}}\naddressType: IPv4\nports: [{{name: grpc, port: {GRPC_PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{web1}\"]}}]\n"
    );
    let steady = items
        .replace("name: items", "name: steady")
        .replace("name: items-v4", "name: steady-v4")
        .replace("service-name: items", "service-name: steady")
        .replace(ITEMS, STEADY)
        .replace(&format!("[\"{web1}\"]"), &format!("[\"{web0}\"]"));
    let items = format!("{items}---\n{steady}");
    m.config(
        "services.yaml",
        Some(&format!("{}---\n{items}", service("hashed", HASHED, &five))),
    );
    m.config(
        "hashed.yaml",
        Some(&policy(
            "hashed",
            "  loadBalancer: {algorithm: ConsistentHash, consistentHash: {header: x-user}}\n",
        )),
    );
    until_policy(&m, "hashed");

    // One key, 100 requests: one endpoint.
    let out = m.run_tool(
        "n0-p0",
        "hits.py",
        &[HASHED, "80", "/", "100", "x-user:alice"],
    );
    assert_eq!(
        out.lines().count(),
        2,
        "one endpoint and the connection count: {out}"
    );
    assert!(out.lines().next().unwrap().ends_with("=100"), "{out}");

    // 100 keys placed; without h2, only h2's keys move.
    let placed = |m: &MeshLab| -> Vec<String> {
        m.run_tool(
            "n0-p0",
            "hits.py",
            &["--list", HASHED, "80", "/", "100", "x-user:user-{i}"],
        )
        .lines()
        .map(|l| l.split(' ').nth(2).unwrap().to_owned())
        .collect()
    };
    let before = placed(&m);
    for name in ["h0", "h1", "h2", "h3", "h4"] {
        assert!(
            before.iter().any(|b| b == name),
            "no key on {name}: {before:?}"
        );
    }
    let four: Vec<(&str, u16)> = five
        .iter()
        .copied()
        .filter(|e| *e != (web0.as_str(), 8082))
        .collect();
    m.config(
        "services.yaml",
        Some(&format!("{}---\n{items}", service("hashed", HASHED, &four))),
    );
    m.until("n0 drops h2", || {
        !node_http(&m.lab, &m.lab.node("n0").unwrap(), "/routes").contains(&format!("{web0}:8082"))
    });
    let after = placed(&m);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if b == "h2" {
            assert_ne!(a, "h2", "user-{i}");
        } else {
            assert_eq!(a, b, "user-{i} moved from {b} to {a}");
        }
    }

    // gRPC: every other Get fails UNAVAILABLE; retried on `unavailable`,
    // the client sees every call succeed.
    let call = || {
        m.run_tool(
            "n0-p0",
            "grpcsvc.py",
            &["call", ITEMS, &GRPC_PORT.to_string()],
        )
    };
    m.config(
        "items.yaml",
        Some(&policy(
            "items",
            "  retries: {attempts: 1, retryOn: [unavailable]}\n",
        )),
    );
    until_policy(&m, "items");
    assert_eq!(
        call(),
        "Get OK Get:1\nDelete OK Delete:1\nCheck OK SERVING\nGet OK Get:1"
    );
    // Aborted with a gRPC code, and with an HTTP status (the code gRPC
    // maps it to), as a gRPC client sees them.
    for (abort, code) in [
        ("grpcStatus: 8", "RESOURCE_EXHAUSTED"),
        ("httpStatus: 503", "UNAVAILABLE"),
    ] {
        m.config(
            "items.yaml",
            Some(&policy(
                "items",
                &format!("  fault: {{abort: {{percent: 100, {abort}}}}}\n"),
            )),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = loop {
            let out = call();
            if out.starts_with(&format!("Get {code}")) || Instant::now() > deadline {
                break out;
            }
        };
        assert_eq!(
            out,
            format!("Get {code} -\nDelete {code} -\nCheck {code} -\nGet {code} -")
        );
    }
    // Over a rate limit (at the destination), RESOURCE_EXHAUSTED naming the
    // policy: one call a second, the channel's four calls in a burst.
    let before = controller_version(&m);
    m.config(
        "steady.yaml",
        Some(&policy(
            "steady",
            "  rateLimit: {requestsPerSecond: 1, burst: 1}\n",
        )),
    );
    until_in_sync(&m, before);
    let out = m.run_tool(
        "n0-p0",
        "grpcsvc.py",
        &["call", STEADY, &GRPC_PORT.to_string()],
    );
    assert_eq!(
        out,
        "Get OK Get:1\nDelete RESOURCE_EXHAUSTED shop/steady\nCheck RESOURCE_EXHAUSTED shop/steady\nGet RESOURCE_EXHAUSTED shop/steady"
    );
}

const LIMITED: &str = "10.96.0.46";

/// `hits.py --rate` from `pod`: (200s, 429s, 429s with Retry-After,
/// seconds taken).
fn paced(m: &MeshLab, pod: &str, rate: u32, n: u32) -> (u32, u32, u32, f64) {
    let out = m.run_tool(
        pod,
        "hits.py",
        &[
            "--rate",
            &rate.to_string(),
            LIMITED,
            "80",
            "/",
            &n.to_string(),
        ],
    );
    (
        count(&out, "200 r"),
        count(&out, "429 rate_limited"),
        count(&out, "retry-after"),
        f64::from(count(&out, "elapsed_ms")) / 1000.0,
    )
}

#[test]
fn a_rate_limit_admits_its_rate_and_per_source_limits_keep_clients_apart() {
    let m = MeshLab::new();
    let web0 = ip(&m, "n1-p0");
    let _server = httpd(&m, "n1-p0", 8080, "r", false);
    m.config(
        "services.yaml",
        Some(&service("limited", LIMITED, &[(&web0, 8080)])),
    );
    let limit = |quota: &str| {
        let before = controller_version(&m);
        m.config(
            "limited.yaml",
            Some(&policy("limited", &format!("  rateLimit: {{{quota}}}\n"))),
        );
        until_in_sync(&m, before);
    };
    limit("requestsPerSecond: 100, burst: 10");
    // Until n1 limits: a quick burst is refused in part.
    m.until("n1 limits requests to limited", || {
        m.try_run_tool("n0-p0", "hits.py", &[LIMITED, "80", "/", "40"])
            .is_ok_and(|o| count(&o, "429 rate_limited") > 0)
    });

    // 300 requests a second (as fast as the client manages: at least 150)
    // against 100/s and a burst of 10 (from whatever the bucket holds):
    // about 100 admitted per second the run took.
    let (ok, limited, retry_after, took) = paced(&m, "n0-p0", 300, 900);
    assert_eq!(ok + limited, 900);
    assert!(
        900.0 / took >= 150.0,
        "the client sent only {:.0}/s",
        900.0 / took
    );
    let expected = 100.0 * took;
    assert!(
        (expected - 30.0..=expected + 40.0).contains(&f64::from(ok)),
        "{ok} admitted in {took:.2} s at 100/s (burst 10)"
    );
    assert_eq!(retry_after, limited, "every 429 says when to retry");
    assert!(event_on(&m, "n1", "limited", "rate_limited") >= f64::from(limited));

    // Shared: a second client (web-1, another identity) sending 10/s loses
    // to the first one's flood of a 20/s limit; per source, it keeps its
    // own share.
    for shared in [true, false] {
        limit(if shared {
            "requestsPerSecond: 20, burst: 5"
        } else {
            "requestsPerSecond: 20, burst: 5, perSource: true"
        });
        let refused_before = event_on(&m, "n1", "limited", "rate_limited");
        let (flood, b_ok, b_limited) = std::thread::scope(|s| {
            let flood = s.spawn(|| paced(&m, "n0-p0", 200, 1000));
            // The second client starts once the flood is over the limit.
            m.until("the flood is refused", || {
                event_on(&m, "n1", "limited", "rate_limited") > refused_before
            });
            let (b_ok, b_limited, ..) = paced(&m, "n1-p1", 10, 30);
            (flood.join().unwrap(), b_ok, b_limited)
        });
        // The flood outlasted the second client and ran over the limit.
        assert!(flood.3 > 3.0 && flood.1 > 0, "{flood:?}");
        if shared {
            assert!(
                b_limited > 10,
                "shared: the flood takes most of it: {b_ok} {b_limited}"
            );
        } else {
            assert_eq!(
                (b_ok, b_limited),
                (30, 0),
                "per source: untouched by the flood"
            );
        }
    }

    // At L4 (the mesh lab's Service web, port `tcp`, xfer.py): connections
    // are limited, 1 a second with a burst of 3.
    let before = controller_version(&m);
    m.config(
        "web.yaml",
        Some(&policy(
            "web",
            "  rateLimit: {requestsPerSecond: 1, burst: 3}\n",
        )),
    );
    until_in_sync(&m, before);
    let started = Instant::now();
    let connected = (0..20)
        .filter(|_| {
            m.try_xfer("n0-p0", &["rr", "10.96.0.20", "80", "hi", "1"])
                .is_ok()
        })
        .count();
    let elapsed = started.elapsed().as_secs_f64();
    let (least, most) = (elapsed.floor() as usize, 3 + elapsed.ceil() as usize);
    assert!(
        (least..=most).contains(&connected),
        "{connected} of 20 connected in {elapsed:.1} s (1/s, burst 3)"
    );
}

/// The controller's configuration version (`lacewing status`).
fn controller_version(m: &MeshLab) -> u64 {
    version_in(&status(m))
}

fn version_in(status: &str) -> u64 {
    status
        .lines()
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("lacewing status names its version")
}

fn status(m: &MeshLab) -> String {
    let mut cmd = std::process::Command::new(bin("lacewing"));
    cmd.args(["status", "--controller", &m.lab.controller_status_addr()]);
    let out = m.lab.run_on_underlay(cmd).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the controller has a version after `before` and both nodes
/// have applied it.
fn until_in_sync(m: &MeshLab, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(m);
        if version_in(&s) > before && s.matches("in sync").count() == 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes never applied a version after {before}:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn event_on(m: &MeshLab, node: &str, service: &str, event: &str) -> f64 {
    m.metric(
        node,
        &format!(
            "lacewing_traffic_policy_events_total{{destination_service=\"shop/{service}\",event=\"{event}\"}}"
        ),
    )
}
