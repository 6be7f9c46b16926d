//! `lacewing demo`: the main job, end to end, in a fresh lab.
//!
//! The services come from Kubernetes YAML in the lab's config folder, served
//! by `lacewing-controller` to a `lacewing-node` on every node.
//!
//! ```text
//!   n0-p0 ──curl──▶ web.default (10.96.0.10:80, fd00:96::10:80)
//!                     ├─▶ n0-p1:8080 (nginx)     lacewing-node on n0 and n1 send each
//!                     ├─▶ n1-p0:8080 (nginx)     connect to a backend at connect()
//!                     └─▶ n1-p1:8080 (nginx)
//!   n1-p1 ──curl──▶ empty.default (10.96.0.11:80, no backend): refused at once
//! ```
//!
//! Then the mesh: namespace `shop` (STRICT) holds n0-p0 (sa client) and
//! n1-p0 (sa web). n0-p0's call to n1-p0 is captured by the kernel and
//! carried in mutual TLS between the node daemons; n0-p1, outside the mesh,
//! is refused; an AuthorizationPolicy denies the client, then is removed.

use std::{collections::BTreeMap, net::IpAddr, process::Command, time::Duration};

use anyhow::Context as _;

use super::{
    maps::{conn_table, services_table},
    sibling_binary,
};
use crate::lab::{Lab, PodSpec, sweep};

pub fn run() -> anyhow::Result<()> {
    let node_bin = sibling_binary("lacewing-node")?;
    sibling_binary("lacewing-controller")?;
    step("bringing up a lab: 2 nodes, 2 pods each");
    let lab = Lab::new(2, 2)?;
    println!("lab {} is up", lab.id().prefix());
    let id = lab.id();
    let result = run_in(&lab, &node_bin);
    step("tearing down");
    lab.down()?;
    let left = sweep::leftovers(id)?;
    anyhow::ensure!(left.is_empty(), "the lab left resources behind: {left:?}");
    println!("lab {} removed; nothing left behind", id.prefix());
    result
}

fn run_in(lab: &Lab, node_bin: &std::path::Path) -> anyhow::Result<()> {
    let (n0, n1) = (lab.node("n0")?, lab.node("n1")?);
    let (n0p0, n0p1, n1p0, n1p1) = (
        lab.pod("n0-p0")?,
        lab.pod("n0-p1")?,
        lab.pod("n1-p0")?,
        lab.pod("n1-p1")?,
    );
    let backends = [&n0p1, &n1p0, &n1p1];
    step("starting nginx in n0-p1, n1-p0, n1-p1 (:8080), each answering its name");
    let _servers = backends
        .iter()
        .map(|p| lab.start_http_server(p, 8080, &p.name()))
        .collect::<Result<Vec<_>, _>>()?;

    step("starting lacewing-controller on the underlay and lacewing-node on each node");
    let bin_dir = node_bin.parent().context("binary folder")?;
    let mesh = lab.start_mesh(bin_dir)?;
    let services = mesh.folder.join("services.yaml");
    step(&format!(
        "writing Services and EndpointSlices to {}",
        services.display()
    ));
    write_atomically(&services, &sample_services(&backends))?;
    for node in [&n0, &n1] {
        wait_services(lab, node, 3)?;
    }
    print!("{}", services_table(&lab.node_bpffs_root(&n0))?);

    for ip in ["10.96.0.10", "fd00:96::10"] {
        let ip: IpAddr = ip.parse()?;
        step(&format!(
            "30 requests from n0-p0 to web.default at {}",
            url(ip)
        ));
        let mut spread = BTreeMap::new();
        for _ in 0..30 {
            *spread.entry(curl(lab, &n0p0, &url(ip))?).or_insert(0) += 1;
        }
        for (backend, n) in &spread {
            println!("  {backend:<8} {n:>3}  {}", "#".repeat(*n));
        }
    }
    step("n1-p1 to empty.default (no ready backend): refused at connect()");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "http://10.96.0.11/"]);
    let out = lab.run_in_pod(&n1p1, cmd)?;
    println!("  curl: {}", String::from_utf8_lossy(&out.stderr).trim());

    for node in [&n0, &n1] {
        step(&format!(
            "node {}: connects counted by service, in the kernel",
            node.name()
        ));
        print!("{}", conn_table(&lab.node_bpffs_root(node))?);
    }
    step("node n0: /metrics on :15020 (service counters, read from the kernel)");
    print_metrics(lab, "n0", "lacewing_service_")?;
    let map = lab
        .node_bpffs_root(&n0)
        .join("maps")
        .join(mesh_common::names::MAP_SERVICES);
    step(&format!(
        "bpftool map dump pinned {} (first entry)",
        map.display()
    ));
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&map)
        .output()
        .context("running bpftool (install it with `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&dump.stdout);
    println!("{}", text.lines().take(22).collect::<Vec<_>>().join("\n"));

    step("taking n0-p1 out of web.default's EndpointSlices (editing the YAML)");
    write_atomically(&services, &sample_services(&[&n1p0, &n1p1]))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut spread = BTreeMap::new();
    while std::time::Instant::now() < deadline {
        spread.clear();
        for _ in 0..20 {
            *spread
                .entry(curl(lab, &n0p0, &url("10.96.0.10".parse()?))?)
                .or_insert(0) += 1;
        }
        if !spread.contains_key("n0-p1") {
            break;
        }
    }
    for (backend, n) in &spread {
        println!("  {backend:<8} {n:>3}  {}", "#".repeat(*n));
    }
    anyhow::ensure!(
        !spread.contains_key("n0-p1"),
        "traffic still reaches n0-p1 after the change"
    );

    mesh_demo(lab, &mesh.folder, &n0p0, &n0p1, &n1p0, &n1p1)?;
    l7_demo(lab, &mesh.folder, &n0p0, &n1p0, &n1p1)?;

    step("lacewing status (asked on the underlay, where the controller is)");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["status", "--controller", &lab.controller_status_addr()]);
    lab.spawn_on_underlay(cmd)?.child_mut().wait()?;

    step("stopping the node daemons (SIGTERM: programs detach, pins removed) and the controller");
    let crate::lab::Mesh {
        mut controller,
        nodes,
        ..
    } = mesh;
    for mut daemon in nodes {
        let status = daemon.terminate(Duration::from_secs(5))?;
        println!("lacewing-node on {} exited: {status}", daemon.place());
        anyhow::ensure!(
            status.success(),
            "lacewing-node on {} failed",
            daemon.place()
        );
    }
    println!(
        "lacewing-controller exited: {}",
        controller.terminate(Duration::from_secs(5))?
    );
    Ok(())
}

/// The mesh part: identities, a STRICT cross-node call, a refused plain
/// call, a policy deny, a same-node call on the kernel fast path.
fn mesh_demo(
    lab: &Lab,
    folder: &std::path::Path,
    client: &PodSpec,
    plain: &PodSpec,
    web: &PodSpec,
    peer: &PodSpec,
) -> anyhow::Result<()> {
    step(
        "enrolling namespace shop in the mesh, STRICT: n0-p0 runs as sa client, n1-p0 and n1-p1 as sa web",
    );
    let pod = |name: &str, sa: &str, node: &str, p: &PodSpec| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{phase: Running, podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]}}\n",
            p.ip4(),
            p.ip6()
        )
    };
    let yaml = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {lacewing.io/mesh: enabled}}\n".to_owned(),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: client, namespace: shop}\n".to_owned(),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n".to_owned(),
        "apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {mtlsMode: Strict}\n".to_owned(),
        pod("client", "client", "n0", client),
        pod("web", "web", "n1", web),
        pod("web-peer", "web", "n1", peer),
    ]
    .join("---\n");
    write_atomically(&folder.join("mesh.yaml"), &yaml)?;
    let web_url = format!("http://{}:8080/", web.ip4());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while curl(lab, plain, &web_url).is_ok() || curl(lab, client, &web_url).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the mesh did not take over within 15 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for node in ["n0", "n1"] {
        step(&format!(
            "node {node}: workload certificates (from /status on :15020)"
        ));
        let status = node_status(lab, node)?;
        for c in status["certificates"].as_array().into_iter().flatten() {
            println!(
                "  {}  serial {}",
                c["identity"].as_str().unwrap_or(""),
                c["serial"].as_str().unwrap_or("")
            );
        }
    }
    step(&format!(
        "n0-p0 (shop/client) to n1-p0 (shop/web) at {web_url}: captured, HBONE over mutual TLS 1.3"
    ));
    println!("  answer: {}", curl(lab, client, &web_url)?);
    print_metrics(lab, "n1", "lacewing_tunnel_streams_opened")?;
    step("n0-p1 (not in the mesh) to n1-p0 in plain text: refused (STRICT)");
    println!(
        "  curl: {}",
        curl(lab, plain, &web_url)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .trim()
    );
    print_metrics(lab, "n1", "lacewing_tunnel_refused")?;

    step("AuthorizationPolicy shop/deny-client: deny spiffe://cluster.local/ns/shop/sa/client");
    let policy = folder.join("deny.yaml");
    write_atomically(
        &policy,
        "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: shop}\nspec: {action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}]}]}\n",
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let denied = loop {
        if let Err(e) = curl(lab, client, &web_url) {
            break e;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the policy did not take effect"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("  curl: {}", denied.to_string().trim());
    print_metrics(lab, "n1", "lacewing_policy_denials")?;
    std::fs::remove_file(&policy)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while curl(lab, client, &web_url).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "access did not come back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("  policy removed: {}", curl(lab, client, &web_url)?);

    step(
        "n1-p1 (shop/web) to n1-p0 on the same node: the kernel fast path (policy decided at connect, no daemon hop)",
    );
    println!("  answer: {}", curl(lab, peer, &web_url)?);
    print_metrics(
        lab,
        "n1",
        "lacewing_fast_path_decisions_total{path=\"kernel\"",
    )?;
    Ok(())
}

/// The L7 act: an HTTPRoute (GAMMA) splitting 90/10 with a header rule,
/// a request refused by method by an L7 policy, and a retry that turns a
/// backend's 503 into the client's 200.
fn l7_demo(
    lab: &Lab,
    folder: &std::path::Path,
    client: &PodSpec,
    stable: &PodSpec,
    canary: &PodSpec,
) -> anyhow::Result<()> {
    step("L7: Services web-stable (n1-p0), web-canary (n1-p1) and front (both), in namespace shop");
    let _flaky = [
        lab.start_http_server(stable, 8081, "retried: n1-p0 answered")?,
        lab.start_http_server_with_status(canary, 8081, "n1-p1 is failing", 503)?,
    ];
    let service = |name: &str, ip: &str, port: u16, pods: &[&PodSpec]| {
        let addresses: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.ip4())).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints: [{{addresses: [{}]}}]\n",
            addresses.join(", ")
        )
    };
    write_atomically(
        &folder.join("l7-services.yaml"),
        &[
            service("web-stable", "10.96.0.51", 8080, &[stable]),
            service("web-canary", "10.96.0.52", 8080, &[canary]),
            service("flaky", "10.96.0.53", 8081, &[stable, canary]),
            service("front", "10.96.0.50", 8080, &[stable, canary]),
        ]
        .join("---\n"),
    )?;
    step(
        "HTTPRoute shop/front: x-canary: 1 -> web-canary; /flaky -> flaky, retried on 503; otherwise web-stable 90 / web-canary 10",
    );
    write_atomically(
        &folder.join("l7-route.yaml"),
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: front, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: front, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: web-canary, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /flaky}}]
    retry: {attempts: 2, codes: [503]}
    backendRefs: [{name: flaky, port: 80}]
  - backendRefs: [{name: web-stable, port: 80, weight: 90}, {name: web-canary, port: 80, weight: 10}]
"#,
    )?;
    let front = "http://10.96.0.50";
    let routed = |lab: &Lab| -> anyhow::Result<bool> {
        let routes = lab.node_get(&lab.node("n0")?, "/routes")?;
        Ok(routes.contains("10.96.0.50:80"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !routed(lab)? {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "n0 did not take the route within 15 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    step("100 requests from n0-p0 (shop/client) to front: each routed on its own by n0's daemon");
    let mut spread = BTreeMap::new();
    for _ in 0..100 {
        *spread.entry(curl(lab, client, front)?).or_insert(0usize) += 1;
    }
    for (backend, n) in &spread {
        println!("  {backend:<8} {n:>3}  {}", "#".repeat(*n / 2));
    }
    step("10 requests with x-canary: 1");
    let mut spread = BTreeMap::new();
    for _ in 0..10 {
        *spread
            .entry(curl_with(lab, client, front, &["-H", "x-canary: 1"])?)
            .or_insert(0usize) += 1;
    }
    for (backend, n) in &spread {
        println!("  {backend:<8} {n:>3}");
    }
    step(
        "10 requests to /flaky: n1-p1 answers 503, the route retries on the other endpoint (and its balancer avoids the failing one after)",
    );
    let mut answers = BTreeMap::new();
    for _ in 0..10 {
        *answers
            .entry(
                curl_with(
                    lab,
                    client,
                    &format!("{front}/flaky"),
                    &["-w", " (%{http_code})"],
                )?
                .replace('\n', ""),
            )
            .or_insert(0usize) += 1;
    }
    for (answer, n) in &answers {
        println!("  {n:>2} x {answer}");
    }
    print_metrics(lab, "n0", "lacewing_request_retries_total")?;

    step(
        "AuthorizationPolicy shop/no-delete (L7): deny DELETE to shop's web pods, decided per request at n1",
    );
    write_atomically(
        &folder.join("l7-policy.yaml"),
        "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: shop}\nspec: {action: Deny, rules: [{to: [{methods: [DELETE]}]}]}\n",
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let refused = loop {
        let out = curl_with(
            lab,
            client,
            front,
            &[
                "-X",
                "DELETE",
                "-H",
                "x-canary: 1",
                "-D",
                "-",
                "-o",
                "/dev/null",
            ],
        )?;
        if out.contains(" 403") {
            break out;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the L7 policy did not take effect within 15 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for line in refused
        .lines()
        .filter(|l| l.starts_with("HTTP/") || l.starts_with("x-lacewing"))
    {
        println!("  DELETE: {}", line.trim());
    }
    println!(
        "  GET: {}",
        curl_with(lab, client, front, &["-H", "x-canary: 1"])?
    );
    print_metrics(lab, "n1", "lacewing_policy_denials")?;
    print_metrics(
        lab,
        "n0",
        "lacewing_requests_total{direction=\"outbound\",source_workload=\"client\"",
    )?;

    step("lacewing routes: what n0 routes by");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "routes",
        "--node-addr",
        &format!("{}:15020", lab.node("n0")?.underlay_ip4()),
    ]);
    lab.spawn_on_underlay(cmd)?.child_mut().wait()?;

    step("lacewing explain shop/client 10.96.0.50:80 --method DELETE: why the DELETE was refused");
    let question = super::explain::Question {
        source: "shop/client".into(),
        destination: "10.96.0.50:80".into(),
        method: "DELETE".into(),
        path: "/".into(),
        headers: vec!["x-canary: 1".into()],
    };
    let answer = super::explain::explain(&super::explain::LabNodes(lab), &question)?;
    print!("{}", super::explain::render(&question, &answer));
    for file in ["l7-policy.yaml", "l7-route.yaml", "l7-services.yaml"] {
        std::fs::remove_file(folder.join(file))?;
    }
    Ok(())
}

fn curl_with(lab: &Lab, from: &PodSpec, url: &str, extra: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5"]).args(extra).arg(url);
    let out = lab.run_in_pod(from, cmd)?;
    anyhow::ensure!(
        out.status.success(),
        "curl {url} from {} failed: {}",
        from.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .replace('\r', "")
        .trim()
        .to_owned())
}

fn node_status(lab: &Lab, node: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &lab.node_get(&lab.node(node)?, "/status")?,
    )?)
}

fn print_metrics(lab: &Lab, node: &str, prefix: &str) -> anyhow::Result<()> {
    for line in lab
        .node_get(&lab.node(node)?, "/metrics")?
        .lines()
        .filter(|l| l.starts_with(prefix))
    {
        println!("  {node}: {line}");
    }
    Ok(())
}

/// Waits until `node`'s kernel maps hold `count` service frontends.
fn wait_services(lab: &Lab, node: &crate::lab::NodeSpec, count: usize) -> anyhow::Result<()> {
    let root = lab.node_bpffs_root(node);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let have = lacewing_node::maps::LbMaps::open(&root)
            .ok()
            .and_then(|m| m.services().ok())
            .map_or(0, |s| s.len());
        if have == count {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "node {} has {have} of {count} services after 10 s",
            node.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes then renames, so the controller never reads half a file.
fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn url(ip: IpAddr) -> String {
    format!("http://{}/", std::net::SocketAddr::new(ip, 80))
}

/// Two Services in Kubernetes YAML: `web` with three backends (dual stack)
/// and `empty` with none.
fn sample_services(backends: &[&PodSpec]) -> String {
    let v4: Vec<String> = backends
        .iter()
        .map(|p| format!("- addresses: [\"{}\"]\n", p.ip4()))
        .collect();
    let v6: Vec<String> = backends
        .iter()
        .map(|p| format!("- addresses: [\"{}\"]\n", p.ip6()))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v4, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{v4}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{v6}---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: 10.96.0.11
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
"#,
        v4 = v4.concat(),
        v6 = v6.concat()
    )
}

fn curl(lab: &Lab, from: &PodSpec, url: &str) -> anyhow::Result<String> {
    curl_with(lab, from, url, &[])
}

fn step(what: &str) {
    println!("\n== {what}");
}
