use std::time::Duration;

use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
};

use super::*;

fn limits(per_source_handshakes: usize, per_source: usize, handshakes: usize) -> Limits {
    Limits {
        handshake_timeout: Duration::from_millis(200),
        max_handshakes: handshakes,
        max_handshakes_per_source: per_source_handshakes,
        max_connections_per_source: per_source,
        ..Limits::default()
    }
}

/// Whether the server reset `client` (what a refused client sees).
async fn was_reset(client: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset
    )
}

fn metric(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test]
async fn a_source_over_its_caps_is_reset_and_counted_and_a_freed_slot_is_reused() {
    let mut registry = Registry::default();
    let admission = Admission::new(
        "tunnel",
        limits(2, 3, 100),
        AdmissionMetrics::new(&mut registry),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let mut clients = Vec::new();
    let mut admitted = Vec::new();
    for _ in 0..2 {
        clients.push(TcpStream::connect(addr).await.unwrap());
        admitted.push(admission.accept(&listener).await);
    }
    // The third handshake from the same address: reset at once.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let taken = tokio::spawn({
        let admission = admission.clone();
        async move { admission.accept(&listener).await }
    });
    assert!(was_reset(&mut third).await);
    // One handshake ends (the peer proved itself): the fourth gets in.
    let Admitted {
        stream: second,
        slot: second_slot,
        handshake,
        ..
    } = admitted.pop().unwrap();
    drop(handshake);
    let fourth = TcpStream::connect(addr).await.unwrap();
    let fourth_in = taken.await.unwrap();
    assert_eq!(fourth_in.from.port(), fourth.local_addr().unwrap().port());
    let text = metric(&registry);
    assert!(
        text.contains(
            "lacewing_listener_refused_total{listener=\"tunnel\",reason=\"per_source_handshakes\"} 1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("lacewing_listener_connections{listener=\"tunnel\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("lacewing_listener_handshakes{listener=\"tunnel\"} 2\n"),
        "{text}"
    );
    drop((fourth_in, second, second_slot, admitted));
    let text = metric(&registry);
    assert!(
        text.contains("lacewing_listener_connections{listener=\"tunnel\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("lacewing_listener_handshakes{listener=\"tunnel\"} 0\n"),
        "{text}"
    );
    assert!(lock(&admission.shared.by_source).is_empty());
    drop(fourth);
}

#[tokio::test]
async fn connections_per_source_and_the_listeners_handshakes_are_capped() {
    let mut registry = Registry::default();
    let admission = Admission::new(
        "controller",
        limits(10, 2, 1),
        AdmissionMetrics::new(&mut registry),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _c1 = TcpStream::connect(addr).await.unwrap();
    let first = admission.accept(&listener).await;
    // The listener's one handshake is taken: the next is refused.
    let mut c2 = TcpStream::connect(addr).await.unwrap();
    let next = tokio::spawn({
        let admission = admission.clone();
        async move {
            let a = admission.accept(&listener).await;
            (a, listener)
        }
    });
    assert!(was_reset(&mut c2).await);
    drop(first.handshake);
    let _c3 = TcpStream::connect(addr).await.unwrap();
    let (second, listener) = next.await.unwrap();
    drop(second.handshake);
    // Two connections from this address are open: a third is refused.
    let mut c4 = TcpStream::connect(addr).await.unwrap();
    let pending = tokio::spawn({
        let admission = admission.clone();
        async move { admission.accept(&listener).await }
    });
    assert!(was_reset(&mut c4).await);
    pending.abort();
    let text = metric(&registry);
    for line in [
        "lacewing_listener_refused_total{listener=\"controller\",reason=\"handshakes\"} 1\n",
        "lacewing_listener_refused_total{listener=\"controller\",reason=\"per_source\"} 1\n",
    ] {
        assert!(text.contains(line), "{text}");
    }
}

#[tokio::test]
async fn a_handshake_that_does_not_finish_in_time_is_counted() {
    let mut registry = Registry::default();
    let admission = Admission::new(
        "tunnel",
        limits(10, 10, 10),
        AdmissionMetrics::new(&mut registry),
    );
    let started = std::time::Instant::now();
    let result = admission.handshake(std::future::pending::<()>()).await;
    assert!(matches!(result, Err(HandshakeTimeout(d)) if d == Duration::from_millis(200)));
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(admission.handshake(async { 7 }).await.unwrap(), 7);
    let text = metric(&registry);
    assert!(
        text.contains(
            "lacewing_listener_timeouts_total{listener=\"tunnel\",phase=\"handshake\"} 1\n"
        ),
        "{text}"
    );
}

#[test]
fn accept_errors_are_sorted_into_what_to_do() {
    let err = |n| std::io::Error::from_raw_os_error(n);
    assert_eq!(after_error(&err(libc::EMFILE)), AfterError::OutOfFiles);
    assert_eq!(after_error(&err(libc::ENFILE)), AfterError::OutOfFiles);
    assert_eq!(after_error(&err(libc::ECONNABORTED)), AfterError::Continue);
    assert_eq!(after_error(&err(libc::ENOBUFS)), AfterError::BackOff);
}
