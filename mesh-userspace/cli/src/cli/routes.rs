//! `lacewing routes`: a node's HTTP routes as its daemon holds them (its
//! `/routes`), one block per routed Service frontend.

use crate::lab::{Lab, LabId};

pub fn run(addr: &str) -> anyhow::Result<i32> {
    let routes = fetch(addr)?;
    print!("{}", render(&routes));
    Ok(0)
}

/// The listing of `/routes` JSON.
pub fn render(routes: &serde_json::Value) -> String {
    let mut out = String::new();
    let frontends = routes.as_array().map(Vec::as_slice).unwrap_or(&[]);
    if frontends.is_empty() {
        out.push_str("no routed Service on this node (every Service is balanced at L4)\n");
    }
    for f in frontends {
        out.push_str(&format!(
            "{} ({}){}\n",
            f["frontend"].as_str().unwrap_or("?"),
            f["service"].as_str().unwrap_or("?"),
            f["policy"]
                .as_str()
                .map_or(String::new(), |p| format!(" TrafficPolicy {p}"))
        ));
        for r in f["rules"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let mut extra = Vec::new();
            if let Some(t) = r["timeout"].as_str() {
                extra.push(format!("timeout {t}"));
            }
            if let Some(n) = r["retries"].as_u64() {
                extra.push(format!("retries {n}"));
            }
            if let Some(n) = r["filters"].as_u64().filter(|n| *n > 0) {
                extra.push(format!("{n} filters"));
            }
            // A Service routed for its TrafficPolicy alone has one rule of
            // no route.
            let rule = match r["route"].as_str() {
                Some("") => "no HTTPRoute".to_owned(),
                route => format!("{}#{}", route.unwrap_or("?"), r["rule"]),
            };
            out.push_str(&format!(
                "  {rule} [{}] clients: {}{}\n",
                r["match"].as_str().unwrap_or("?"),
                r["clients"].as_str().unwrap_or("?"),
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(", {}", extra.join(", "))
                }
            ));
            for b in r["backends"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let endpoints: Vec<&str> = b["endpoints"]
                    .as_array()
                    .map(|e| e.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                // The balancing is shown when a TrafficPolicy sets it.
                let policy = b["policy"].as_str().map_or(String::new(), |p| {
                    format!(
                        ", {} (TrafficPolicy {p})",
                        b["balance"].as_str().unwrap_or("PeakEwma")
                    )
                });
                out.push_str(&format!(
                    "    -> {} weight {}{policy}: {}\n",
                    b["service"].as_str().unwrap_or("?"),
                    b["weight"],
                    if endpoints.is_empty() {
                        "no ready endpoint (503)".to_owned()
                    } else {
                        endpoints.join(" ")
                    }
                ));
            }
        }
    }
    out
}

fn fetch(addr: &str) -> anyhow::Result<serde_json::Value> {
    super::get_json(addr, "/routes", "the node daemon")
}

/// Runs `lacewing routes` again on the lab's underlay, where the node's
/// metrics port is reachable.
pub fn run_in_lab(lab: Option<LabId>, node: &str) -> anyhow::Result<i32> {
    let lab = Lab::open(super::lab::resolve(lab)?)?;
    let spec = lab.node(node)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args([
        "routes",
        "--node-addr",
        &format!("{}:15020", spec.underlay_ip4()),
    ]);
    let mut child = lab.spawn_on_underlay(cmd)?;
    let status = child.child_mut().wait()?;
    Ok(status.code().unwrap_or(1))
}
