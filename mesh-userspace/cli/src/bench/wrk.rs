//! wrk, as the benchmarks run it: short connections (one request each) from
//! a lab pod, a run with any failed request being no measurement.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context as _, bail};

use crate::lab::{Lab, PodSpec};

/// What one wrk run made: requests (each one connection) and their rate.
pub struct Wrk {
    pub rate: f64,
    pub requests: u64,
}

/// Runs wrk (one thread, `connections` at a time) in `client` against
/// ip:port for `seconds` with `Connection: close`: one TCP connection per
/// request, so its rate is connections per second.
pub fn short_connections(
    lab: &Lab,
    client: &PodSpec,
    ip: Ipv4Addr,
    port: u16,
    connections: u32,
    seconds: u32,
) -> anyhow::Result<Wrk> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t",
        "1",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
    ])
    .args(["-H", "Connection: close", &format!("http://{ip}:{port}/")]);
    let out = lab
        .run_in_pod(client, cmd)
        .context("running wrk (install it with `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if std::env::var_os("LACEWING_BENCH_VERBOSE").is_some() {
        eprintln!("wrk {ip}:{port}:\n{text}");
    }
    if !out.status.success() {
        bail!(
            "wrk against {ip}:{port} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(errors) = wrk_errors(&text) {
        bail!(
            "wrk against {ip}:{port}: {errors}; a rate with failed requests is no measurement:\n{text}"
        );
    }
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    // "  123456 requests in 5.00s, 12.34MB read"
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    Ok(Wrk { rate, requests })
}

/// What went wrong in a wrk run, if anything: socket errors of any kind
/// (`Socket errors: connect 0, read 0, write 0, timeout 3`) or responses
/// other than 2xx/3xx (`Non-2xx or 3xx responses: 12`).
fn wrk_errors(text: &str) -> Option<String> {
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                if let (Some(kind), Some(n)) = (words.next(), words.next())
                    && n != "0"
                {
                    found.push(format!("{n} {kind} errors"));
                }
            }
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:")
            && n.trim() != "0"
        {
            found.push(format!("{} non-2xx responses", n.trim()));
        }
    }
    (!found.is_empty()).then(|| found.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_runs_with_errors_or_bad_responses_are_failed_measurements() {
        let clean = "Running 5s test\n  Requests/sec:   9000.00\n";
        assert_eq!(wrk_errors(clean), None);
        let timeouts =
            "  Socket errors: connect 0, read 0, write 0, timeout 3\nRequests/sec: 1.0\n";
        assert_eq!(wrk_errors(timeouts).as_deref(), Some("3 timeout errors"));
        let bad = "  Non-2xx or 3xx responses: 12\n  Socket errors: connect 2, read 0, write 0, timeout 0\n";
        assert_eq!(
            wrk_errors(bad).as_deref(),
            Some("12 non-2xx responses, 2 connect errors")
        );
    }
}
