//! HTTPRoutes (GAMMA) applied by the client's node, per request, with real
//! HTTP clients and servers: a weighted split on one keep-alive connection,
//! a header rule, a redirect, a rewrite with header modifiers, a timeout, a
//! retry; and no route for a request dialled to a pod or sent by a pod
//! outside the mesh.
//!
//! ```text
//!   namespace shop (lacewing.io/mesh=enabled)
//!   n0-p0 client (sa client)                n0-p1 plain (namespace default)
//!   n1-p0 web-0: httpd.py 8080 "web-v1"     n1-p1 web-1: httpd.py 8080 "web-v2"
//!   Service front 10.96.0.32:80 -> both; web-v1 10.96.0.30 -> web-0;
//!   web-v2 10.96.0.31 -> web-1
//! ```

use std::time::Instant;

use lacewing_tests::{
    h2load_all_succeed,
    mesh_lab::{MeshLab, field},
    run_in,
};

const HTTP_PORT: u16 = 8080;
const FRONT: &str = "10.96.0.32";

fn service(name: &str, ip: &str, endpoints: &[&str]) -> String {
    let addresses: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-v4, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [{}]}}]\n",
        addresses.join(", ")
    )
}

const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: front, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: front, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /moved}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.shop, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-added, value: "yes"}], remove: [x-secret]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-resp, value: routed}]}
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /delay}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /flaky}}]
    retry: {attempts: 2, codes: [503], backoff: 10ms}
    backendRefs: [{name: web-v1, port: 80}]
  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: web-v2, port: 80}}
    backendRefs: [{name: web-v1, port: 80}]
"#;

/// httpd.py in `pod` on [`HTTP_PORT`], answering as `name`.
fn httpd(m: &MeshLab, pod: &str, name: &str) -> lacewing::lab::LabProcess {
    m.serve_tool(pod, "httpd.py", &[&HTTP_PORT.to_string(), name], HTTP_PORT)
}

/// curl from `pod`: status, then the given response headers, then the body.
fn curl(m: &MeshLab, pod: &str, url: &str, extra: &[&str]) -> String {
    try_curl(m, pod, url, extra).unwrap_or_else(|err| panic!("curl {url}: {err}"))
}

/// As [`curl`], or curl's error (while a configuration is on its way).
fn try_curl(m: &MeshLab, pod: &str, url: &str, extra: &[&str]) -> Result<String, String> {
    let mut args = vec!["-sS", "--max-time", "5", "-D", "-"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = run_in(&m.lab, &m.lab.pod(pod).unwrap(), "curl", &args);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn count(out: &str, key: &str) -> u32 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn routes_split_match_redirect_rewrite_time_out_and_retry_per_request() {
    let m = MeshLab::new();
    let _v1 = httpd(&m, "n1-p0", "web-v1");
    let _v2 = httpd(&m, "n1-p1", "web-v2");
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let web1 = m.lab.pod("n1-p1").unwrap().ip4().to_string();
    m.config(
        "services.yaml",
        Some(
            &[
                service("web-v1", "10.96.0.30", &[&web0]),
                service("web-v2", "10.96.0.31", &[&web1]),
                service("front", FRONT, &[&web0, &web1]),
            ]
            .join("---\n"),
        ),
    );
    m.config("route.yaml", Some(ROUTE));
    let front = format!("http://{FRONT}");
    m.until("n0 routes requests to front", || {
        try_curl(&m, "n0-p0", &format!("{front}/old/x"), &[])
            .is_ok_and(|o| o.contains("GET /new/x"))
    });

    // 500 requests on one keep-alive connection, split per request 90/10.
    let out = m.run_tool("n0-p0", "hits.py", &[FRONT, "80", "/split", "500"]);
    let (v1, v2) = (count(&out, "200 web-v1"), count(&out, "200 web-v2"));
    assert_eq!(v1 + v2, 500, "{out}");
    assert!((425..=475).contains(&v1), "90% within 5 points: {out}");
    assert_eq!(count(&out, "connections"), 1, "{out}");

    // h2load (HTTP/1.1, 4 connections): every request routed and answered.
    let before = m.metric(
        "n0",
        "lacewing_requests_total{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/front\"",
    );
    h2load_all_succeed(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        200,
        &["--h1", "-c", "4", &format!("http://{FRONT}/load")],
    );
    let after = m.metric(
        "n0",
        "lacewing_requests_total{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/front\"",
    );
    assert_eq!(
        after - before,
        200.0,
        "each of h2load's requests routed once"
    );
    // n0's router keeps its connections to the endpoints (tunnel streams,
    // open at n1) for the next requests, and closes them after seconds
    // unused.
    let opened = "lacewing_tunnel_streams_opened_total{direction=\"inbound\"}";
    let closed = "lacewing_tunnel_streams_closed_total{direction=\"inbound\"}";
    let open = |m: &MeshLab| m.metric("n1", opened) - m.metric("n1", closed);
    assert!(open(&m) >= 1.0, "pooled after h2load: {}", open(&m));
    m.until("n0's pooled connections close once idle", || {
        open(&m) == 0.0
    });
    // n0 counts them as the outbound tunnel streams they are: every stream
    // n1 took came from n0's router.
    for (n1, n0) in [
        (
            opened,
            "lacewing_tunnel_streams_opened_total{direction=\"outbound\"}",
        ),
        (
            closed,
            "lacewing_tunnel_streams_closed_total{direction=\"outbound\"}",
        ),
    ] {
        assert_eq!(m.metric("n0", n0), m.metric("n1", n1), "{n0}");
    }

    // A header match wins over the split.
    let out = m.run_tool(
        "n0-p0",
        "hits.py",
        &[FRONT, "80", "/split", "20", "x-canary:1"],
    );
    assert_eq!(count(&out, "200 web-v2"), 20, "{out}");

    // Redirect: 301 with the new path, nothing sent to a backend.
    let out = curl(&m, "n0-p0", &format!("{front}/moved/a?q=1"), &[]);
    assert!(out.starts_with("HTTP/1.1 301"), "{out}");
    assert!(
        out.contains("\nlocation: http://10.96.0.32/new?q=1\n"),
        "{out}"
    );

    // Rewrite: the backend sees the new path and host, the set header and
    // not the removed one; the client sees the added response header.
    let out = curl(
        &m,
        "n0-p0",
        &format!("{front}/old/x?y=2"),
        &["-H", "x-secret: s", "-H", "x-keep: k"],
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\nx-resp: routed\n"), "{out}");
    let mut body: Vec<&str> = out.split("\n\n").nth(1).unwrap().lines().collect();
    // The request line, then the headers in any order.
    body[1..].sort_unstable();
    assert_eq!(
        body,
        [
            "web-v1 GET /new/x?y=2",
            "host: rewritten.shop",
            "x-added: yes",
            "x-keep: k",
        ],
        "{out}"
    );

    // Timeout: a backend that answers after 1 s gives 504 at about 0.5 s.
    let started = Instant::now();
    let out = curl(&m, "n0-p0", &format!("{front}/delay/1000"), &[]);
    let took = started.elapsed().as_secs_f64();
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(out.contains("\nx-lacewing-error: timeout\n"), "{out}");
    assert!((0.45..0.95).contains(&took), "answered after {took:.2} s");

    // A body over the retry buffer (64 KiB) is sent once: the first answer
    // for its path, 503, is the client's.
    let big = m.lab.state_dir().join("big.bin");
    std::fs::write(&big, vec![b'x'; 100 * 1024]).unwrap();
    let out = curl(
        &m,
        "n0-p0",
        &format!("{front}/flaky/big"),
        &["--data-binary", &format!("@{}", big.display())],
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("web-v1 POST /flaky/big body=102400"), "{out}");
    // Retry: the first /flaky/small answer is 503, the retry's 200; a
    // small POST body is kept and sent again whole.
    let out = curl(
        &m,
        "n0-p0",
        &format!("{front}/flaky/small"),
        &["--data-binary", "0123456789"],
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("web-v1 POST /flaky/small body=10\n"), "{out}");
    assert_eq!(
        m.metric("n0", "lacewing_request_retries_total{route=\"shop/front\"}"),
        1.0
    );
    assert_eq!(
        m.metric(
            "n0",
            "lacewing_request_timeouts_total{route=\"shop/front\"}"
        ),
        1.0
    );
    // Every request counted at the source, by status.
    let ok = "lacewing_requests_total{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/front\",destination_workload=\"\",destination_namespace=\"shop\",route=\"shop/front\",code=\"200\",grpc_status=\"\",mesh_flag=\"\"}";
    assert!(m.metric("n0", ok) >= 522.0, "{}", m.metric("n0", ok));

    // The CLI lists the frontend's rules in Gateway API's precedence order
    // (longer path prefixes first, then more header matches) with their
    // endpoints.
    let listing = m.routes_listing("n0");
    let (v1, v2) = (format!("{web0}:{HTTP_PORT}"), format!("{web1}:{HTTP_PORT}"));
    assert_eq!(
        listing,
        format!(
            "10.96.0.32:80 (shop/front:80)
  shop/front#6 [PathPrefix /mirror] clients: all, 1 filters
    -> shop/web-v1:80 weight 1: {v1}
  shop/front#1 [PathPrefix /moved] clients: all, 1 filters
  shop/front#3 [PathPrefix /delay] clients: all, timeout 500ms
    -> shop/web-v1:80 weight 1: {v1}
  shop/front#4 [PathPrefix /flaky] clients: all, retries 2
    -> shop/web-v1:80 weight 1: {v1}
  shop/front#2 [PathPrefix /old] clients: all, 3 filters
    -> shop/web-v1:80 weight 1: {v1}
  shop/front#0 [PathPrefix /, header x-canary=1] clients: all
    -> shop/web-v2:80 weight 1: {v2}
  shop/front#5 [PathPrefix /] clients: all
    -> shop/web-v1:80 weight 90: {v1}
    -> shop/web-v2:80 weight 10: {v2}
"
        )
    );

    // A mirrored request: the client gets web-v1's answer; web-v2 gets a
    // copy, fire and forget, counted apart.
    let out = curl(&m, "n0-p0", &format!("{front}/mirror/x"), &[]);
    assert!(out.contains("web-v1 GET /mirror/x\n"), "{out}");
    let mirrored = "lacewing_requests_mirrored_total{destination_service=\"shop/web-v2\"}";
    m.until("the mirror's copy is answered", || {
        m.metric("n0", mirrored) == 1.0
    });

    // Dialled to a pod: no Service, so no route (Gateway API's mesh rule).
    let out = curl(
        &m,
        "n0-p0",
        &format!("http://{web0}:{HTTP_PORT}/old/x"),
        &[],
    );
    assert!(out.contains("web-v1 GET /old/x\n"), "{out}");
    // A client outside the mesh is balanced by the kernel, unrouted.
    let out = curl(&m, "n0-p1", &format!("{front}/old/x"), &[]);
    assert!(
        out.contains("web-v1 GET /old/x\n") || out.contains("web-v2 GET /old/x\n"),
        "{out}"
    );
}

/// front over web-0 with three ports: HTTP (80), a server-first protocol
/// on a port named `mysql` (3306) and the same on a port named `db` (3307),
/// which says nothing of its protocol.
fn front_with_server_first_ports(web0: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: front, namespace: shop}}\nspec: {{clusterIP: {FRONT}, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}, {{name: mysql, port: 3306, targetPort: {GREETER_PORT}}}, {{name: db, port: 3307, targetPort: {GREETER_PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: front-v4, namespace: shop, labels: {{kubernetes.io/service-name: front}}}}\naddressType: IPv4\nports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}, {{name: mysql, port: {GREETER_PORT}, protocol: TCP}}, {{name: db, port: {GREETER_PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{web0}\"]}}]\n"
    )
}

const GREETER_PORT: u16 = 3306;
const GRPC_PORT: u16 = 50051;
const GRPC_VIP: &str = "10.96.0.33";
const H2C_PORT: u16 = 8082;
const H2C_VIP: &str = "10.96.0.34";

#[test]
fn routed_grpc_websocket_and_same_node_requests_and_non_http_at_l4() {
    let m = MeshLab::new();
    let _v1 = httpd(&m, "n1-p0", "web-v1");
    let _grpc = m.serve_tool(
        "n1-p0",
        "grpcsvc.py",
        &["serve", &GRPC_PORT.to_string()],
        GRPC_PORT,
    );
    let _greeter = m.serve_tool(
        "n1-p0",
        "greeter.py",
        &["serve", &GREETER_PORT.to_string()],
        GREETER_PORT,
    );
    // nginx over h2c, answering with the host it was asked for, ending
    // each connection after 30 requests (GOAWAY), as it does after 1,000 by
    // default.
    let web1_pod = m.lab.pod("n1-p1").unwrap();
    let _h2web = m
        .lab
        .start_h2c_server_closing_after(&web1_pod, H2C_PORT, "h2web $host", 30)
        .unwrap();
    let web1 = web1_pod.ip4().to_string();
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    m.config(
        "services.yaml",
        Some(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: h2web, namespace: shop}}\nspec: {{clusterIP: {H2C_VIP}, ports: [{{name: http2, port: 80, targetPort: {H2C_PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: h2web-v4, namespace: shop, labels: {{kubernetes.io/service-name: h2web}}}}\naddressType: IPv4\nports: [{{name: http2, port: {H2C_PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{web1}\"]}}]\n---\n{}---\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: items, namespace: shop}}\nspec: {{clusterIP: {GRPC_VIP}, ports: [{{name: grpc, port: {GRPC_PORT}, appProtocol: grpc}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: items-v4, namespace: shop, labels: {{kubernetes.io/service-name: items}}}}\naddressType: IPv4\nports: [{{name: grpc, port: {GRPC_PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{web0}\"]}}]\n",
            service("web-v1", "10.96.0.30", &[&web0]),
            front_with_server_first_ports(&web0),
        )),
    );
    m.config(
        "route.yaml",
        Some(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: front, namespace: shop}}\nspec: {{parentRefs: [{{kind: Service, name: front}}], rules: [{{backendRefs: [{{name: web-v1, port: 80}}]}}]}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: items, namespace: shop}}\nspec: {{parentRefs: [{{kind: Service, name: items}}], rules: [{{backendRefs: [{{name: items, port: {GRPC_PORT}}}]}}]}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: h2web, namespace: shop}}\nspec: {{parentRefs: [{{kind: Service, name: h2web}}], rules: [{{backendRefs: [{{name: h2web, port: 80}}]}}]}}\n"
        )),
    );
    let requests = |node: &str, service: &str| {
        m.metric(
            node,
            &format!("lacewing_requests_total{{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/{service}\",destination_workload=\"\",destination_namespace=\"shop\",route=\"shop/{service}\",code=\"200\",grpc_status=\"\",mesh_flag=\"\"}}"),
        )
    };
    // Until n0 routes (before, the kernel balances: the same pod answers,
    // but no request is counted).
    m.until("n0 routes requests to front", || {
        let _ = try_curl(&m, "n0-p0", &format!("http://{FRONT}/x"), &[]);
        requests("n0", "front") >= 1.0
    });

    // A server-first protocol on a port of the routed Service: named
    // `mysql`, it is never routed, and its greeting comes at once; on a
    // port whose name says nothing, the route applies, the node waits for
    // the client's first bytes up to 300 ms, then carries it at L4.
    let out = m.run_tool("n0-p0", "greeter.py", &["time", FRONT, "3306"]);
    assert_eq!(field(&out, "greeting"), "220_greeter_ready", "{out}");
    assert!(field(&out, "ms").parse::<u32>().unwrap() < 150, "{out}");
    let out = m.run_tool("n0-p0", "greeter.py", &["time", FRONT, "3307"]);
    assert_eq!(field(&out, "greeting"), "220_greeter_ready", "{out}");
    let ms: u32 = field(&out, "ms").parse().unwrap();
    assert!((290..1000).contains(&ms), "{out}");
    assert_eq!(
        m.metric("n0", "lacewing_l7_fallbacks_total{reason=\"silent\"}"),
        1.0
    );

    // gRPC through a route: h2c to the pod, trailers intact, the channel's
    // calls routed one by one (each counted with its gRPC status).
    m.until("n0 routes gRPC calls", || {
        m.run_tool("n0-p0", "grpcsvc.py", &["call", GRPC_VIP, &GRPC_PORT.to_string()]);
        m.metric(
            "n0",
            "lacewing_requests_total{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",destination_service=\"shop/items\",destination_workload=\"\",destination_namespace=\"shop\",route=\"shop/items\",code=\"200\",grpc_status=\"0\",mesh_flag=\"\"}",
        ) >= 1.0
    });
    let out = m.run_tool(
        "n0-p0",
        "grpcsvc.py",
        &["call", GRPC_VIP, &GRPC_PORT.to_string()],
    );
    assert_eq!(
        out,
        "Get OK Get:1\nDelete OK Delete:1\nCheck OK SERVING\nGet OK Get:1"
    );
    // h2load over h2c through a route: 200 requests on 2 connections, 10
    // at a time, to an nginx that closes its connection every 30 requests;
    // n0's pool opens new ones and sends again what a closing one refused
    // unprocessed: every request answered, each routed once.
    let text = h2load_all_succeed(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        200,
        &["-c", "2", "-m", "10", &format!("http://{H2C_VIP}/load")],
    );
    assert!(text.contains("Application protocol: h2c"), "{text}");
    assert_eq!(requests("n0", "h2web"), 200.0, "each routed once");
    // Over HTTP/2 the pod sees the authority the client sent.
    let out = curl(
        &m,
        "n0-p0",
        &format!("http://{H2C_VIP}/"),
        &["--http2-prior-knowledge", "-H", "host: shop.example"],
    );
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.ends_with("\nh2web shop.example\n"), "{out}");

    // With an L7 policy at the destination: the refusal passes back through
    // the router as the client's PERMISSION_DENIED.
    m.config(
        "no-delete.yaml",
        Some("apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: shop}\nspec: {action: Deny, rules: [{to: [{paths: [/shop.Items/Delete]}]}]}\n"),
    );
    let mut out = String::new();
    m.until("n1 refuses routed Delete calls", || {
        out = m.run_tool(
            "n0-p0",
            "grpcsvc.py",
            &["call", GRPC_VIP, &GRPC_PORT.to_string()],
        );
        // (A pooled connection open when the policy lands is closed; a
        // round it cut is tried again.)
        out.contains("PERMISSION_DENIED") && out.matches(" OK ").count() == 3
    });
    assert_eq!(
        out,
        "Get OK Get:1\nDelete PERMISSION_DENIED shop/no-delete\nCheck OK SERVING\nGet OK Get:1"
    );
    // Counted at the destination too, where the policy decided it.
    assert_eq!(
        m.metric(
            "n1",
            "lacewing_requests_total{direction=\"inbound\",source_workload=\"\",source_namespace=\"shop\",destination_service=\"\",destination_workload=\"web-0\",destination_namespace=\"shop\",route=\"\",code=\"200\",grpc_status=\"7\",mesh_flag=\"\"}"
        ),
        1.0
    );

    // A WebSocket-style upgrade through the route carries bytes both ways.
    assert_eq!(
        m.run_tool("n0-p0", "upgrade.py", &[FRONT, "80", "20"]),
        "101 echoed=20"
    );

    // On one node: n1-p1 (meshed) to front, routed by n1 to web-0 on n1.
    let out = curl(&m, "n1-p1", &format!("http://{FRONT}/same"), &[]);
    assert!(out.contains("web-v1 GET /same\n"), "{out}");
    assert_eq!(
        m.metric(
            "n1",
            "lacewing_requests_total{direction=\"outbound\",source_workload=\"web-1\",source_namespace=\"shop\",destination_service=\"shop/front\",destination_workload=\"\",destination_namespace=\"shop\",route=\"shop/front\",code=\"200\",grpc_status=\"\",mesh_flag=\"\"}"
        ),
        1.0
    );

    // Bytes that are not HTTP on the routed port: carried at L4 to the
    // pod (whose HTTP server answers 400 itself), counted.
    let out = run_in(
        &m.lab,
        &m.lab.pod("n0-p0").unwrap(),
        "python3",
        &[
            "-c",
            &format!(
                "import socket; s = socket.create_connection(('{FRONT}', 80), timeout=5); s.sendall(b'\\x16\\x03\\x01 garbage\\r\\n\\r\\n'); print(s.recv(200).split(b'\\r\\n')[0].decode())"
            ),
        ],
    );
    let first = String::from_utf8_lossy(&out.stdout);
    assert!(
        first.contains(" 400 "),
        "{first} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        m.metric("n0", "lacewing_l7_fallbacks_total{reason=\"not_http\"}"),
        1.0
    );
}

#[test]
fn a_consumer_route_applies_only_to_its_namespaces_clients() {
    // n0-p1 is a meshed pod of namespace team; shop's n0-p0 is the other
    // client.
    let m = MeshLab::build(&[], false);
    let _v1 = httpd(&m, "n1-p0", "web-v1");
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    let team = m.lab.pod("n0-p1").unwrap();
    m.config(
        "team.yaml",
        Some(&[
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: team, labels: {lacewing.io/mesh: enabled}}\n".to_owned(),
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: tool, namespace: team}\n".to_owned(),
            lacewing_tests::mesh_lab::pod("team", "tool", "tool", "n0", [team.ip4().to_string(), team.ip6().to_string()]),
            service("front", FRONT, &[&web0]),
        ]
        .join("---\n")),
    );
    m.wait_for_certificate("n0", "spiffe://cluster.local/ns/team/sa/tool");
    // The producer route (shop's) for every client; team's own route
    // replaces it for team's clients: /team is redirected, the rest 404.
    m.config(
        "routes.yaml",
        Some(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: producer, namespace: shop}\nspec: {parentRefs: [{kind: Service, name: front}], rules: [{backendRefs: [{name: front, port: 80}]}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: consumer, namespace: team}\nspec: {parentRefs: [{kind: Service, name: front, namespace: shop}], rules: [{matches: [{path: {type: PathPrefix, value: /team}}], filters: [{type: RequestRedirect, requestRedirect: {hostname: team.example, statusCode: 302}}]}]}\n",
        ),
    );
    let front = format!("http://{FRONT}");
    m.until("n0 takes both routes", || {
        try_curl(&m, "n0-p1", &format!("{front}/team/x"), &[])
            .is_ok_and(|o| o.starts_with("HTTP/1.1 302"))
    });
    let out = curl(&m, "n0-p1", &format!("{front}/team/x"), &[]);
    assert!(
        out.contains("\nlocation: http://team.example/team/x\n"),
        "{out}"
    );
    let out = curl(&m, "n0-p1", &format!("{front}/other"), &[]);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains("\nx-lacewing-error: no_route\n"), "{out}");
    // shop's client gets the producer route for the same paths.
    let out = curl(&m, "n0-p0", &format!("{front}/team/x"), &[]);
    assert!(out.contains("web-v1 GET /team/x\n"), "{out}");
    let out = curl(&m, "n0-p0", &format!("{front}/other"), &[]);
    assert!(out.contains("web-v1 GET /other\n"), "{out}");
}

#[test]
fn matches_by_regular_expression_exact_path_header_query_and_method_on_the_bound_port_only() {
    let m = MeshLab::new();
    let _v1 = httpd(&m, "n1-p0", "web-v1");
    let web0 = m.lab.pod("n1-p0").unwrap().ip4().to_string();
    // front: port 80 (the route's) and 8081 (no route), both to web-0.
    m.config(
        "front.yaml",
        Some(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: front, namespace: shop}}\nspec: {{clusterIP: {FRONT}, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}, {{name: http-alt, port: 8081, targetPort: {HTTP_PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: front-v4, namespace: shop, labels: {{kubernetes.io/service-name: front}}}}\naddressType: IPv4\nports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}, {{name: http-alt, port: {HTTP_PORT}, protocol: TCP}}]\nendpoints: [{{addresses: [\"{web0}\"]}}]\n"
        )),
    );
    let rule = |matches: &str, name: &str| {
        format!(
            "  - matches: [{matches}]\n    filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-rule, value: {name}}}]}}}}]\n    backendRefs: [{{name: front, port: 80}}]\n"
        )
    };
    m.config(
        "route.yaml",
        Some(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: front, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, name: front, port: 80}}]\n  rules:\n{}{}{}{}{}{}",
            rule("{path: {type: RegularExpression, value: \"/v[0-9]+/items\"}}", "regex"),
            rule("{headers: [{type: RegularExpression, name: x-user, value: \"team-[a-z]+\"}]}", "header-regex"),
            rule("{path: {type: PathPrefix, value: /q}, queryParams: [{name: env, value: prod}]}", "query"),
            rule("{method: DELETE}", "method"),
            rule("{path: {type: Exact, value: /exact}}", "exact"),
            rule("{path: {type: PathPrefix, value: /}}", "default"),
        )),
    );
    let rule_of = |method: &str, url: &str| -> String {
        let (url, user) = url.split_once(' ').unwrap_or((url, ""));
        let header = format!("x-user: {user}");
        let mut extra = vec!["-X", method, "-o", "/dev/null"];
        if !user.is_empty() {
            extra.extend(["-H", &header]);
        }
        let out = curl(&m, "n0-p0", url, &extra);
        out.lines()
            .find_map(|l| l.strip_prefix("x-rule: "))
            .unwrap_or("none")
            .to_owned()
    };
    let front = format!("http://{FRONT}");
    m.until("n0 routes front:80", || {
        try_curl(&m, "n0-p0", &format!("{front}/exact"), &["-o", "/dev/null"])
            .is_ok_and(|o| o.contains("x-rule: exact"))
    });
    for (method, path, expected) in [
        ("GET", "/v2/items", "regex"),
        // A regular expression matches the whole path.
        ("GET", "/v2/items/x", "default"),
        ("GET", "/q?env=prod", "query"),
        ("GET", "/q?env=dev", "default"),
        // A prefix matches whole segments: /q is not a prefix of /query.
        ("GET", "/query?env=prod", "default"),
        ("DELETE", "/anything", "method"),
        ("GET", "/exact", "exact"),
        ("GET", "/exact/x", "default"),
        // A header's regular expression matches its whole value.
        ("GET", "/h team-shop", "header-regex"),
        ("GET", "/h team-42", "default"),
        ("GET", "/h my-team-shop", "default"),
        ("GET", "/h", "default"),
    ] {
        assert_eq!(
            rule_of(method, &format!("{front}{path}")),
            expected,
            "{method} {path}"
        );
    }
    // The Service's other port is not the route's: balanced at L4, unrouted.
    assert_eq!(
        rule_of("GET", &format!("http://{FRONT}:8081/v2/items")),
        "none"
    );
}
