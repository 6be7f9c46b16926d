//! Outbound: where a captured connection goes, the wait for a new pod's
//! certificate, and an established connection closed by a policy change.

use std::{
    fs::File,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use lacewing_core::pki::Svid;
use lacewing_tunnel::metrics::PolicyLabels;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{Captured, OutboundError, Route};
use crate::{fixtures::*, testing::Fixed};

#[test]
fn the_route_follows_where_the_destination_runs() {
    let state = Arc::new(Fixed::new(
        vec![
            workload("web", "web", "10.244.1.10", true),
            workload("db", "db", "10.244.1.11", false),
        ],
        vec![peer("10.244.2.20", "shop", "api", "n2")],
        vec![],
    ));
    let proxy = proxy(state, Duration::ZERO);
    let route = |dest: &str| proxy.outbound.route(dest.parse().unwrap());
    assert_eq!(route("10.244.1.10:80"), Route::SameNode);
    match route("10.244.2.20:8080") {
        Route::Tunnel(to) => assert_eq!(
            (to.node.as_str(), to.service_account.as_str()),
            ("n2", "api")
        ),
        other => panic!("expected the tunnel to n2, got {other:?}"),
    }
    // Not meshed here, and unknown: the connection goes out unchanged.
    assert_eq!(route("10.244.1.11:5432"), Route::PassThrough);
    assert_eq!(route("93.184.216.34:443"), Route::PassThrough);
}

fn svid() -> (Arc<Svid>, String) {
    (
        Arc::new(Svid {
            identity: CLIENT.into(),
            cert_chain_pem: vec![],
            key_pem: String::new(),
            not_after: SystemTime::UNIX_EPOCH,
        }),
        "01".into(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_new_pods_connection_waits_for_its_certificate() {
    let state = Arc::new(Fixed::new(vec![], vec![], vec![]));
    let proxy = proxy(Arc::clone(&state), Duration::from_secs(5));
    let issuer = tokio::spawn({
        let state = Arc::clone(&state);
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            state.add_certificate(CLIENT, svid());
        }
    });
    let started = tokio::time::Instant::now();
    let (_, serial) = proxy.outbound.certificate(CLIENT).await.unwrap();
    assert_eq!(serial, "01");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "woken when it was stored"
    );
    issuer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_wait_for_a_certificate_is_bounded() {
    let state = Arc::new(Fixed::new(vec![], vec![], vec![]));
    let proxy = proxy(state, Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    let err = proxy.outbound.certificate(OTHER).await.unwrap_err();
    assert!(matches!(err, OutboundError::NoCertificate { .. }), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

/// An echo server on `ip`; its address.
async fn echo(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A connection as the capture listener would accept it from `source`:
/// the app's end, and what the proxy gets.
async fn captured(
    source: &lacewing_core::model::workloads::Workload,
    dest: SocketAddr,
) -> (TcpStream, Captured) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    let conn = Captured {
        source: Arc::new(source.clone()),
        netns: Arc::new(File::open("/dev/null").unwrap()),
        netns_cookie: 0,
        app: accepted,
        dest,
    };
    (app, conn)
}

async fn round_trip(app: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    app.write_all(msg).await?;
    let mut got = vec![0; msg.len()];
    app.read_exact(&mut got).await?;
    Ok(got)
}

#[tokio::test]
async fn a_connection_goes_out_unchanged_to_what_is_not_meshed() {
    let dest = echo("127.0.0.1").await;
    let client = workload("client", "client", "127.0.0.3", true);
    let state = Arc::new(Fixed::new(vec![client.clone()], vec![], vec![]));
    let proxy = Arc::new(proxy(state, Duration::ZERO));
    let (mut app, conn) = captured(&client, dest).await;
    let handled = tokio::spawn({
        let proxy = Arc::clone(&proxy);
        async move { proxy.outbound.handle(conn).await }
    });
    assert_eq!(round_trip(&mut app, b"hello").await.unwrap(), b"hello");
    assert_eq!(proxy.registry.len(), 1, "registered while it lives");
    drop(app);
    handled.await.unwrap();
    assert_eq!(proxy.registry.len(), 0);
}

#[tokio::test]
async fn an_established_connection_is_reset_when_a_policy_starts_denying_it() {
    // client (127.0.0.3) and web (127.0.0.2) are meshed pods on this node.
    let web_addr = echo("127.0.0.2").await;
    let web = workload("web", "web", "127.0.0.2", true);
    let client = workload("client", "client", "127.0.0.3", true);
    let state = Arc::new(Fixed::new(
        vec![web, client.clone()],
        vec![peer("127.0.0.3", "shop", "client", "n1")],
        vec![],
    ));
    let proxy = Arc::new(proxy(Arc::clone(&state), Duration::ZERO));
    let recheck = tokio::spawn({
        let proxy = Arc::clone(&proxy);
        async move { proxy.recheck_on_change().await }
    });
    let (mut app, conn) = captured(&client, web_addr).await;
    tokio::spawn({
        let proxy = Arc::clone(&proxy);
        async move { proxy.outbound.handle(conn).await }
    });
    assert_eq!(round_trip(&mut app, b"before").await.unwrap(), b"before");

    state.set_policies(vec![policy(
        "deny-client",
        "{action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}]}]}",
    )]);
    let changed = Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(1), app.read(&mut buf))
        .await
        .expect("the connection is closed within a second of the policy");
    let err = read.expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(changed.elapsed() < Duration::from_secs(1));
    let denials = proxy
        .metrics
        .policy_denials
        .get_or_create(&PolicyLabels {
            policy: "shop/deny-client".into(),
        })
        .get();
    assert_eq!(denials, 1);
    recheck.abort();
}
