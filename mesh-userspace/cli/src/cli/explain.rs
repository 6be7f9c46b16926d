//! `lacewing explain <source> <destination>`: why a connection (or an HTTP
//! request) from a pod to a destination goes where it goes, or fails, in
//! one answer. The node of the source answers its side from the state it
//! acts on (its admin endpoint's `/explain`: the kernel's services and
//! fast-path verdicts, routes, ejections, TrafficPolicies); the node of
//! the pod the connection reaches answers the destination's side (mTLS
//! mode, AuthorizationPolicies and their verdict). In the lab every node is
//! asked; on a node, only the node's own daemon is (the destination's
//! side then needs the same command on the destination's node).

use anyhow::Context as _;
use lacewing_sys::http::percent_encode;
use serde_json::Value;

use crate::lab::{Lab, LabId};

/// What is asked.
#[derive(Debug, Clone)]
pub struct Question {
    pub source: String,
    pub destination: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<String>,
}

impl Question {
    fn query(&self, source: &str, destination: &str) -> String {
        let mut q = format!(
            "/explain?source={}&destination={}&method={}&path={}",
            percent_encode(source),
            percent_encode(destination),
            percent_encode(&self.method),
            percent_encode(&self.path)
        );
        for h in &self.headers {
            q.push_str(&format!("&header={}", percent_encode(h)));
        }
        q
    }
}

/// The walk, both sides, and the verdict.
#[derive(Debug, serde::Serialize)]
pub struct Answer {
    pub verdict: String,
    pub reason: String,
    pub steps: Vec<Value>,
}

/// Where the daemons are asked: named nodes (the lab's), or one admin
/// address (this node's).
pub trait Nodes {
    /// Every node's answer to `path` (a node that cannot be asked is left
    /// out, with a note).
    fn ask_all(&self, path: &str) -> Vec<(String, anyhow::Result<Value>)>;
}

/// Asks the nodes and puts the two sides together.
pub fn explain(nodes: &dyn Nodes, q: &Question) -> anyhow::Result<Answer> {
    let answers = nodes.ask_all(&q.query(&q.source, &q.destination));
    let mut reachable = Vec::new();
    for (node, a) in answers {
        match a {
            Ok(v) => reachable.push(v),
            Err(err) => eprintln!("note: node {node} could not be asked: {err:#}"),
        }
    }
    let Some(source) = reachable.iter().find(|a| a["source_here"] == true) else {
        // Asked on the destination's node (as another node's answer
        // says): its side alone.
        if let Some(dest) = reachable.iter().find(|a| a["destination_here"] == true) {
            let verdict = dest["verdict"].as_str().unwrap_or("continue");
            return Ok(Answer {
                verdict: if verdict == "continue" {
                    "undecided"
                } else {
                    verdict
                }
                .to_owned(),
                reason: dest["reason"].as_str().unwrap_or_default().to_owned(),
                steps: dest["steps"].as_array().cloned().unwrap_or_default(),
            });
        }
        anyhow::bail!(
            "no node asked holds the source `{}`: give a pod IP or namespace/name of a pod on {}",
            q.source,
            if reachable.len() == 1 {
                "this node"
            } else {
                "a node of the lab"
            }
        );
    };
    let mut steps: Vec<Value> = source["steps"].as_array().cloned().unwrap_or_default();
    let mut verdict = source["verdict"].as_str().unwrap_or("continue").to_owned();
    let mut reason = source["reason"].as_str().unwrap_or_default().to_owned();
    if verdict == "continue" && source["destination_here"] != true {
        let hand_off = source["hand_off"]["address"].as_str().unwrap_or_default();
        let from = source["source_address"].as_str().unwrap_or(&q.source);
        let again = nodes.ask_all(&q.query(from, hand_off));
        match again
            .into_iter()
            .filter_map(|(_, a)| a.ok())
            .find(|a| a["destination_here"] == true)
        {
            Some(dest) => {
                // The destination's node repeats no source step: it does
                // not hold the source.
                steps.extend(dest["steps"].as_array().cloned().unwrap_or_default());
                verdict = dest["verdict"].as_str().unwrap_or("continue").to_owned();
                reason = dest["reason"].as_str().unwrap_or_default().to_owned();
            }
            None => {
                let node = source["hand_off"]["node"].as_str().unwrap_or("its node");
                reason = format!(
                    "the destination's side is decided on {node}: run `lacewing explain {from} {hand_off}` there"
                );
            }
        }
    }
    if verdict == "continue" {
        verdict = "undecided".into();
    }
    Ok(Answer {
        verdict,
        reason,
        steps,
    })
}

/// The answer for people.
pub fn render(q: &Question, a: &Answer) -> String {
    let mut out = format!(
        "{} -> {} ({} {})\n",
        q.source, q.destination, q.method, q.path
    );
    for s in &a.steps {
        out.push_str(&format!(
            "  {:<12} {:<7} {}: {}\n",
            s["layer"].as_str().unwrap_or("?"),
            s["result"].as_str().unwrap_or("?"),
            s["check"].as_str().unwrap_or("?"),
            s["detail"].as_str().unwrap_or("")
        ));
    }
    out.push_str(&format!(
        "VERDICT: {}: {}\n",
        a.verdict.to_uppercase(),
        a.reason
    ));
    out
}

/// The lab's nodes, asked from inside each node (the admin endpoint is on
/// the node's loopback).
pub struct LabNodes<'a>(pub &'a Lab);

impl Nodes for LabNodes<'_> {
    fn ask_all(&self, path: &str) -> Vec<(String, anyhow::Result<Value>)> {
        self.0
            .topology()
            .nodes()
            .map(|n| {
                let answer = self
                    .0
                    .node_http(&n, crate::lab::ADMIN_PORT, path)
                    .map_err(anyhow::Error::from)
                    .and_then(|body| {
                        serde_json::from_str(&body).with_context(|| {
                            format!("the admin endpoint answered: {}", body.trim())
                        })
                    });
                (n.name(), answer)
            })
            .collect()
    }
}

/// This node's daemon, at its admin address.
pub struct LocalNode(pub String);

impl Nodes for LocalNode {
    fn ask_all(&self, path: &str) -> Vec<(String, anyhow::Result<Value>)> {
        vec![(
            self.0.clone(),
            super::get_json(&self.0, path, "the node daemon's admin endpoint"),
        )]
    }
}

pub fn run(
    lab: Option<Option<LabId>>,
    admin_addr: &str,
    q: &Question,
    json: bool,
) -> anyhow::Result<i32> {
    let answer = match lab {
        Some(id) => explain(&LabNodes(&Lab::open(super::lab::resolve(id)?)?), q)?,
        None => explain(&LocalNode(admin_addr.to_owned()), q)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", render(q, &answer));
    }
    // Scripts can tell a refusal from an allowed connection.
    Ok(match answer.verdict.as_str() {
        "allowed" => 0,
        "undecided" => 3,
        _ => 2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Vec<Value>);

    impl Nodes for Fake {
        fn ask_all(&self, path: &str) -> Vec<(String, anyhow::Result<Value>)> {
            // The second round asks for the pod the source's node named.
            let second = path.contains("destination=10.0.1.5%3A80");
            self.0
                .iter()
                .filter(|v| {
                    (v["destination_here"] == true) == second || v["source_here"] == true && !second
                })
                .map(|v| (v["node"].as_str().unwrap().to_owned(), Ok(v.clone())))
                .collect()
        }
    }

    #[test]
    fn the_destinations_node_finishes_what_the_sources_node_started() {
        let source = serde_json::json!({
            "node": "n0", "source_here": true, "destination_here": false,
            "source_address": "10.0.0.5",
            "steps": [{"layer": "kernel", "check": "LW_SERVICES", "result": "pass", "detail": "balanced"}],
            "hand_off": {"address": "10.0.1.5:80", "node": "n1"},
            "verdict": "continue", "reason": ""
        });
        let dest = serde_json::json!({
            "node": "n1", "source_here": false, "destination_here": true,
            "steps": [{"layer": "destination", "check": "GET /", "result": "deny", "detail": "shop/deny-all"}],
            "verdict": "denied", "reason": "by AuthorizationPolicy shop/deny-all"
        });
        let q = Question {
            source: "shop/client".into(),
            destination: "10.96.0.10:80".into(),
            method: "GET".into(),
            path: "/".into(),
            headers: vec![],
        };
        let a = explain(&Fake(vec![source, dest]), &q).unwrap();
        assert_eq!(a.verdict, "denied");
        assert_eq!(a.steps.len(), 2);
        assert!(
            render(&q, &a).ends_with("VERDICT: DENIED: by AuthorizationPolicy shop/deny-all\n")
        );
    }
}
