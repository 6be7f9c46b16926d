//! The tunnel in one process over loopback: real TLS 1.3, real HTTP/2
//! CONNECT, a real TCP echo server as the destination pod.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::FutureExt as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{
    Peer, Refusal,
    client::{Destination, Pool, TunnelError},
    metrics::{DirectionLabels, ReasonLabels, TunnelMetrics},
    server::{self, Connector},
    tls,
};
use lacewing_core::pki::{self, Ca, Svid};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SOURCE: &str = "10.244.0.10";

struct Setup {
    dir: PathBuf,
    ca: Ca,
    roots: Arc<rustls::RootCertStore>,
    tunnel: SocketAddr,
    echo: SocketAddr,
    metrics: TunnelMetrics,
    /// Drains the tunnel server (GOAWAY, no more accepting).
    drain: tokio_util::sync::CancellationToken,
    /// The server's listening socket, a second handle, and what serves it:
    /// for a successor taking over, as a node daemon's upgrade does.
    listener: std::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    connector: Connector,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lacewing-tunnel-{tag}-{}", std::process::id()))
}

fn svid(ca: &Ca, identity: &str, ttl: Duration) -> Svid {
    let (key, csr) = pki::new_key_and_csr(identity).unwrap();
    let cert = ca.sign_csr(&csr, identity, ttl).unwrap();
    Svid {
        identity: identity.to_owned(),
        not_after: pki::not_after(&cert).unwrap(),
        cert_chain_pem: vec![cert],
        key_pem: key.serialize_pem(),
    }
}

/// An echo server (the destination pod) and the tunnel server of node n1,
/// which refuses a stream whose source address is not `SOURCE` with WEB.
async fn setup(tag: &str) -> Setup {
    let dir = temp_dir(tag);
    let ca = Ca::load_or_create(&dir.join("ca")).unwrap();
    ca.issue_node(&dir.join("n1"), pki::DEFAULT_TRUST_DOMAIN, "n1")
        .unwrap();
    let (bundle, cert, key) = pki::read_credentials(&dir.join("n1")).unwrap();
    let roots = tls::roots(&bundle).unwrap();
    let config =
        tls::server_config(&cert, &key, Arc::clone(&roots), tls::ClientCert::Required).unwrap();

    let echo_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = echo_listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo_listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });

    let connector: Connector = Arc::new(|peer: Peer, dest: SocketAddr| {
        async move {
            if peer.source != Some(SOURCE.parse().unwrap()) || peer.identity != WEB {
                return Err(Refusal::new(
                    403,
                    "identity_mismatch",
                    format!("{:?} is not {WEB}", peer.source),
                ));
            }
            let stream = TcpStream::connect(dest)
                .await
                .map_err(|e| Refusal::new(503, "connect_failed", e.to_string()))?;
            let carry: server::Carry = Box::new(move |tunnel| splice(tunnel, stream).boxed());
            Ok(carry)
        }
        .boxed()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel = listener.local_addr().unwrap();
    let second = listener.into_std().unwrap();
    let listener = TcpListener::from_std(second.try_clone().unwrap()).unwrap();
    let metrics = TunnelMetrics::default();
    let drain = tokio_util::sync::CancellationToken::new();
    let config = Arc::new(config);
    tokio::spawn(server::serve(
        listener,
        Arc::new(std::sync::RwLock::new(Arc::clone(&config))),
        Arc::clone(&connector),
        metrics.clone(),
        test_admission(),
        drain.clone(),
    ));
    Setup {
        dir,
        ca,
        roots,
        tunnel,
        echo,
        metrics,
        drain,
        listener: second,
        config,
        connector,
    }
}

fn test_admission() -> lacewing_sys::admission::Admission {
    lacewing_sys::admission::Admission::new(
        "tunnel",
        lacewing_sys::admission::Limits::default(),
        lacewing_sys::admission::AdmissionMetrics::default(),
    )
}

impl Setup {
    fn dest(&self) -> Destination {
        Destination {
            node: self.tunnel,
            node_identity: pki::node_identity(pki::DEFAULT_TRUST_DOMAIN, "n1"),
            pod: self.echo,
        }
    }

    /// A second tunnel server on the same socket, as a successor daemon;
    /// its metrics.
    fn serve_again(&self) -> TunnelMetrics {
        let listener = TcpListener::from_std(self.listener.try_clone().unwrap()).unwrap();
        let metrics = TunnelMetrics::default();
        tokio::spawn(server::serve(
            listener,
            Arc::new(std::sync::RwLock::new(Arc::clone(&self.config))),
            Arc::clone(&self.connector),
            metrics.clone(),
            test_admission(),
            tokio_util::sync::CancellationToken::new(),
        ));
        metrics
    }

    fn handshake_failures(&self, reason: &str) -> u64 {
        self.metrics
            .handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .get()
    }
}

fn source() -> IpAddr {
    SOURCE.parse().unwrap()
}

#[tokio::test]
async fn bytes_cross_both_ways_with_half_close_over_one_pooled_connection() {
    let s = setup("bytes").await;
    let pool = Pool::new(None);
    let id = svid(&s.ca, WEB, Duration::from_secs(3600));
    for round in 0..3 {
        let upgraded = pool
            .open(&id, "1", Arc::clone(&s.roots), source(), &s.dest())
            .await
            .unwrap();
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let payload: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 + round) as u8).collect();
        io.write_all(&payload).await.unwrap();
        // Half-close: the echo server sees EOF, answers everything, closes.
        io.shutdown().await.unwrap();
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), payload.len());
        assert!(back == payload, "round {round}: bytes differ");
    }
    assert_eq!(pool.connections(), 1, "three streams, one connection");
}

/// A stream and its echo of `payload`.
async fn echo_through(io: &mut hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, payload: &[u8]) {
    io.write_all(payload).await.unwrap();
    let mut back = vec![0; payload.len()];
    io.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
}

#[tokio::test]
async fn after_the_server_drains_a_new_stream_goes_to_its_successor_and_the_open_one_goes_on() {
    let s = setup("handover").await;
    let pool = Pool::new(None);
    let id = svid(&s.ca, WEB, Duration::from_secs(3600));
    let dest = s.dest();
    let open = || pool.open(&id, "1", Arc::clone(&s.roots), source(), &dest);
    let mut first = hyper_util::rt::TokioIo::new(open().await.unwrap());
    echo_through(&mut first, b"before").await;
    // The server hands over: GOAWAY on its connection, and a successor
    // accepts on the same socket.
    s.drain.cancel();
    let successor = s.serve_again();
    let inbound = || {
        successor
            .opened
            .get_or_create(&DirectionLabels {
                direction: "inbound",
            })
            .get()
    };
    // A stream sent before the GOAWAY arrived is still served by the
    // draining server; once it arrived, the pooled connection takes no new
    // stream and each goes to the successor on a new connection. Every one
    // succeeds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while inbound() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no stream reached the successor"
        );
        let mut next = hyper_util::rt::TokioIo::new(open().await.unwrap());
        echo_through(&mut next, format!("after {i}").as_bytes()).await;
        i += 1;
    }
    for i in 0..3 {
        let mut next = hyper_util::rt::TokioIo::new(open().await.unwrap());
        echo_through(&mut next, format!("then {i}").as_bytes()).await;
    }
    assert_eq!(
        inbound(),
        4,
        "from the first on, every stream went to the successor"
    );
    // The stream opened before the drain carries on to its end.
    echo_through(&mut first, b"still here").await;
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(
        pool.connections(),
        1,
        "the drained connection is no longer pooled"
    );
}

#[tokio::test]
async fn a_source_that_is_not_its_identity_is_refused() {
    let s = setup("mismatch").await;
    let pool = Pool::new(None);
    let other = svid(
        &s.ca,
        "spiffe://cluster.local/ns/shop/sa/admin",
        Duration::from_secs(3600),
    );
    let err = pool
        .open(&other, "1", Arc::clone(&s.roots), source(), &s.dest())
        .await
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::Refused(_, _, code) if code == 403),
        "{err}"
    );
}

#[tokio::test]
async fn certificates_from_another_ca_or_expired_are_rejected_in_the_handshake() {
    let s = setup("rejects").await;
    let pool = Pool::new(None);
    // Another CA.
    let other_dir = temp_dir("other-ca");
    let other_ca = Ca::load_or_create(&other_dir).unwrap();
    let foreign = svid(&other_ca, WEB, Duration::from_secs(3600));
    let _ = std::fs::remove_dir_all(&other_dir);
    assert!(
        pool.open(&foreign, "1", Arc::clone(&s.roots), source(), &s.dest())
            .await
            .is_err()
    );
    // Expired (valid for one second, used after two).
    let short = svid(&s.ca, WEB, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        pool.open(&short, "2", Arc::clone(&s.roots), source(), &s.dest())
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another Lacewing cluster's CA carries its own key's tag in its name,
    // so no root of ours is its issuer.
    assert_eq!(s.handshake_failures("unknown_issuer"), 1);
    assert_eq!(s.handshake_failures("expired"), 1);
    // A server that is not the node the client meant is refused by the client.
    let mut wrong = s.dest();
    wrong.node_identity = pki::node_identity(pki::DEFAULT_TRUST_DOMAIN, "n2");
    let good = svid(&s.ca, WEB, Duration::from_secs(3600));
    let err = pool
        .open(&good, "3", Arc::clone(&s.roots), source(), &wrong)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lacewing/node/n2"), "{err}");
}

#[tokio::test]
async fn tls_1_2_is_refused() {
    let s = setup("tls12").await;
    let id = svid(&s.ca, WEB, Duration::from_secs(3600));
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(tls::certs(s.ca.pem()).unwrap());
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tls::certs(&id.cert_chain_pem[0]).unwrap(),
            tls::key(&id.key_pem).unwrap(),
        )
        .unwrap();
    let tcp = TcpStream::connect(s.tunnel).await.unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::IpAddress(s.tunnel.ip().into()),
            tcp,
        )
        .await;
    assert!(result.is_err(), "a TLS 1.2 handshake must fail");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.handshake_failures("incompatible"), 1);
}

#[test]
fn forwarded_round_trips_both_families() {
    for ip in ["10.244.0.10", "fd00:244::10"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(super::parse_forwarded(&super::forwarded_for(ip)), Some(ip));
    }
    assert_eq!(super::parse_forwarded("by=x"), None);
}

#[tokio::test]
async fn a_slow_reader_bounds_what_is_buffered() {
    let s = setup("backpressure").await;
    // A destination that accepts and never reads.
    let stuck = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut dest = s.dest();
    dest.pod = stuck.local_addr().unwrap();
    let (hold_tx, mut hold_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((conn, _)) = stuck.accept().await {
            let _ = hold_tx.send(conn);
        }
    });
    let id = svid(&s.ca, WEB, Duration::from_secs(3600));
    let upgraded = Pool::new(None)
        .open(&id, "1", Arc::clone(&s.roots), source(), &dest)
        .await
        .unwrap();
    let _held = hold_rx.recv().await;
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    let block = vec![7u8; 64 << 10];
    let mut written = 0usize;
    // Write until a write has made no progress for half a second.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), io.write(&block)).await {
        written += n;
        assert!(written < 256 << 20, "256 MiB accepted without a reader");
    }
    // The HTTP/2 windows (4 MiB stream), the copy buffer and the kernel's
    // socket buffers: bounded, whatever the sender does.
    assert!(
        written < 32 << 20,
        "{written} bytes buffered for a reader that never reads"
    );
    assert!(
        written > 1 << 20,
        "{written}: the stream should carry something before it blocks"
    );
}

/// The test connector's carry: copies both ways until both sides are done
/// (the node's carry is the proxy's, with watches and the registry).
async fn splice<A, B>(mut a: A, mut b: B) -> (u64, u64)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(
        &mut a,
        &mut b,
        crate::COPY_BUFFER,
        crate::COPY_BUFFER,
    )
    .await
    {
        Ok(counts) => counts,
        Err(err) => {
            tracing::debug!(%err, "stream reset");
            (0, 0)
        }
    }
}
