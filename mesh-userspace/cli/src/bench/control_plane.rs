//! `bench control-plane`: a real `lacewing-controller` (its own process, the
//! folder source, gRPC with mutual TLS over loopback) serving N simulated
//! nodes in this process (real streams; each decodes its updates, checks
//! they chain, and ACKs; no eBPF).
//!
//! Measured: time until every node has acknowledged the first full
//! configuration; for each of `changes` single-endpoint edits, the time from
//! writing the file to the last node's ACK; the bytes of that update per
//! node; the controller's peak RSS and CPU seconds.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use prost::Message as _;
use tokio::sync::mpsc;

use lacewing_core::pki;
use lacewing_core::proto::pb::{self, node_message::Kind};
use lacewing_node::{client, config::Controller};

const SERVICES_PER_FILE: u32 = 100;

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u32,
    pub services: u32,
    pub endpoints: u32,
    pub changes: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub full_sync_s: f64,
    pub p50_change_ms: f64,
    pub p99_change_ms: f64,
    pub bytes_per_node_per_change: u64,
    pub controller_rss_mb: f64,
    pub controller_cpu_s: f64,
}

/// One node's ACK, as the bench saw it.
struct Ack {
    version: u64,
    at: Instant,
    bytes: usize,
}

pub fn run(controller_bin: &Path, opts: &Options) -> anyhow::Result<Outcome> {
    let dir = std::env::temp_dir().join(format!("lacewing-bench-cp-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let folder = dir.join("config");
    std::fs::create_dir_all(&folder)?;
    let per_service = opts.endpoints / opts.services.max(1);
    let files = opts.services.div_ceil(SERVICES_PER_FILE);
    for f in 0..files {
        std::fs::write(
            folder.join(format!("services-{f:04}.yaml")),
            file_yaml(f, opts.services, per_service, 0),
        )?;
    }
    println!(
        "bench control-plane: {} nodes, {} services, {} endpoints ({} per service) in {files} files; {} changes",
        opts.nodes,
        opts.services,
        per_service * opts.services,
        per_service,
        opts.changes
    );

    let grpc = free_port()?;
    let http = free_port()?;
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let mut controller = Command::new(controller_bin)
        .arg("--folder")
        .arg(&folder)
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .arg("--pki-dir")
        .arg(dir.join("pki"))
        .args(["--server-ip", "127.0.0.1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting lacewing-controller")?;
    let pid = controller.id();
    let result = (|| {
        wait_port(grpc)?;
        let ca = pki::Ca::load_or_create(&dir.join("pki").join("ca"))?;
        let creds: Vec<PathBuf> = (0..opts.nodes)
            .map(|i| {
                let d = dir.join("nodes").join(node_name(i));
                ca.issue_node(&d, pki::DEFAULT_TRUST_DOMAIN, &node_name(i))
                    .map(|()| d)
            })
            .collect::<Result<_, _>>()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(measure(grpc, &folder, creds, opts, per_service, files))
    })();
    // Read before the controller is stopped; a failed read fails the run
    // once it is stopped, instead of printing 0.
    let usage = super::tunnel::memory(pid)
        .and_then(|memory| Ok((memory, super::tunnel::process_ticks(pid)?)));
    let _ = controller.kill();
    let _ = controller.wait();
    let mut outcome = result?;
    let (memory, ticks) = usage?;
    println!(
        "controller RSS at the end {:.0} MB (peak {:.0} MB)",
        memory.rss_mb, memory.peak_mb
    );
    outcome.controller_rss_mb = memory.peak_mb;
    outcome.controller_cpu_s = ticks as f64 / super::tunnel::ticks_per_second();
    Ok(outcome)
}

async fn measure(
    grpc: u16,
    folder: &Path,
    creds: Vec<PathBuf>,
    opts: &Options,
    per_service: u32,
    files: u32,
) -> anyhow::Result<Outcome> {
    let (acks_tx, mut acks) = mpsc::unbounded_channel::<(usize, Ack)>();
    let started = Instant::now();
    for (i, tls_dir) in creds.into_iter().enumerate() {
        let controller = Controller {
            url: format!("https://127.0.0.1:{grpc}"),
            tls_dir,
            server_name: pki::CONTROLLER_SERVER_NAME.into(),
        };
        let acks_tx = acks_tx.clone();
        tokio::spawn(async move {
            if let Err(err) = simulated_node(i, controller, acks_tx).await {
                eprintln!("simulated node {i}: {err}");
            }
        });
    }
    let n = opts.nodes as usize;
    // Full sync: every node acknowledges a first configuration.
    let mut latest = vec![0u64; n];
    let mut synced = 0;
    while synced < n {
        let (i, ack) = recv(&mut acks, Duration::from_secs(600))
            .await
            .context("full sync")?;
        if latest[i] == 0 {
            synced += 1;
        }
        latest[i] = ack.version;
    }
    let full_sync_s = started.elapsed().as_secs_f64();
    println!("full sync of {n} nodes: {full_sync_s:.2} s");

    let mut latencies = Vec::new();
    let mut bytes = Vec::new();
    for c in 0..opts.changes {
        let before = *latest.iter().max().unwrap_or(&0);
        let f = c % files;
        let path = folder.join(format!("services-{f:04}.yaml"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, file_yaml(f, opts.services, per_service, c + 1))?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, &path)?;
        let mut done = vec![false; n];
        let mut remaining = n;
        let mut last = t0;
        let mut change_bytes = 0usize;
        while remaining > 0 {
            let (i, ack) = recv(&mut acks, Duration::from_secs(60))
                .await
                .with_context(|| format!("change {c}"))?;
            latest[i] = ack.version;
            if ack.version > before && !done[i] {
                done[i] = true;
                remaining -= 1;
                last = last.max(ack.at);
                change_bytes += ack.bytes;
            }
        }
        let ms = last.duration_since(t0).as_secs_f64() * 1000.0;
        latencies.push(ms);
        bytes.push(change_bytes / n);
        // Let the folder's modification time move on before the next edit.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "change to all-acked, ms: min {:.1} p50 {:.1} p99 {:.1} max {:.1}",
        latencies[0],
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    Ok(Outcome {
        full_sync_s,
        p50_change_ms: pct(0.5),
        p99_change_ms: pct(0.99),
        bytes_per_node_per_change: (bytes.iter().sum::<usize>() / bytes.len().max(1)) as u64,
        ..Outcome::default()
    })
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, within: Duration) -> anyhow::Result<T> {
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Some(v)) => Ok(v),
        Ok(None) => bail!("every simulated node stopped"),
        Err(_) => bail!("no ACK within {within:?}"),
    }
}

/// A node without eBPF: subscribes, checks each delta applies on top of the
/// version it has, ACKs.
async fn simulated_node(
    i: usize,
    controller: Controller,
    acks: mpsc::UnboundedSender<(usize, Ack)>,
) -> anyhow::Result<()> {
    let (tx, mut updates) = client::subscribe(&controller, &node_name(i as u32), 0).await?;
    let mut version = 0;
    let mut pending: Option<pb::ConfigUpdate> = None;
    let mut bytes = 0;
    while let Some(piece) = updates.message().await? {
        bytes += piece.encoded_len();
        let Some(update) = lacewing_core::proto::chunks::assemble(&mut pending, piece)? else {
            continue;
        };
        if update.base_version != 0 && update.base_version != version {
            anyhow::bail!(
                "delta on top of {} but the node has {version}",
                update.base_version
            );
        }
        version = update.version;
        tx.send(pb::NodeMessage {
            kind: Some(Kind::Ack(pb::Ack { version })),
        })
        .await?;
        let _ = acks.send((
            i,
            Ack {
                version,
                at: Instant::now(),
                bytes,
            },
        ));
        bytes = 0;
    }
    Ok(())
}

fn node_name(i: u32) -> String {
    format!("node-{i:04}")
}

/// File `f`: Services and EndpointSlices `f*100 ..`; `edit` moves one
/// endpoint of its first service (0: none).
fn file_yaml(f: u32, services: u32, per_service: u32, edit: u32) -> String {
    let mut out = String::new();
    let first = f * SERVICES_PER_FILE;
    for i in first..(first + SERVICES_PER_FILE).min(services) {
        let ip = Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let _ = write!(
            out,
            "kind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec: {{clusterIP: \"{ip}\", ports: [{{name: http, port: 80}}]}}\n---\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {{name: s{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        );
        for j in 0..per_service {
            let shift = if i == first && j == 0 { edit * 7919 } else { 0 };
            let n = (i * per_service + j + shift) % (1 << 24);
            let _ = writeln!(
                out,
                "- addresses: [\"{}\"]",
                Ipv4Addr::new(10, 128 + (n >> 16) as u8 % 64, (n >> 8) as u8, n as u8)
            );
        }
        out.push_str("---\n");
    }
    out
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the controller did not listen on {addr}")
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The closing line the issue asks for.
pub fn result_line(opts: &Options, o: &Outcome) -> String {
    format!(
        "RESULT control-plane nodes={} services={} endpoints={} full_sync_s={:.2} p50_change_ms={:.1} p99_change_ms={:.1} bytes_per_node_per_change={} controller_rss_mb={:.0}",
        opts.nodes,
        opts.services,
        opts.endpoints,
        o.full_sync_s,
        o.p50_change_ms,
        o.p99_change_ms,
        o.bytes_per_node_per_change,
        o.controller_rss_mb
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_moves_exactly_one_endpoint() {
        let a = file_yaml(3, 1000, 10, 0);
        let b = file_yaml(3, 1000, 10, 1);
        let diff = a.lines().zip(b.lines()).filter(|(x, y)| x != y).count();
        assert_eq!(diff, 1);
        assert_eq!(a.matches("kind: Service\n").count(), 100);
    }
}
