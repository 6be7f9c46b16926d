use std::time::Duration;

use super::*;
use crate::answer::ERROR_HEADER;

#[test]
fn http_is_told_from_other_first_bytes() {
    assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
    assert!(looks_like_http(b"DELETE /x HTTP/1.1"));
    assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM"));
    // A MySQL greeting, TLS, garbage, a lower-case word: not HTTP.
    assert!(!looks_like_http(b"\x4a\x00\x00\x00\x0a8.0.3"));
    assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
    assert!(!looks_like_http(b"hello world"));
    assert!(!looks_like_http(b"GETTINGLONG /"));
}

#[test]
fn grpc_timeouts_are_read_in_their_units_and_bad_ones_ignored() {
    assert_eq!(grpc_timeout("500m"), Some(Duration::from_millis(500)));
    assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
    assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(grpc_timeout("100u"), Some(Duration::from_micros(100)));
    assert_eq!(grpc_timeout("123456789S"), None, "at most 8 digits");
    assert_eq!(grpc_timeout("5x"), None);
    assert_eq!(grpc_timeout("S"), None);
}

fn backend(name: &str, weight: u32) -> model::Backend {
    model::Backend {
        namespace: "shop".into(),
        name: name.into(),
        port: Some(80),
        weight,
        filters: Vec::new(),
    }
}

#[test]
fn backends_are_chosen_by_weight_and_a_zero_total_chooses_none() {
    let backends = [backend("v1", 90), backend("v2", 10), backend("off", 0)];
    let mut v1 = 0;
    for _ in 0..10_000 {
        match pick_backend(&backends).unwrap().name.as_str() {
            "v1" => v1 += 1,
            "v2" => {}
            other => panic!("weight 0 chosen: {other}"),
        }
    }
    assert!((8_800..=9_200).contains(&v1), "{v1} of 10000");
    assert!(pick_backend(&[backend("off", 0)]).is_none());
    assert!(pick_backend(&[]).is_none());
}

#[test]
fn a_mesh_made_error_is_grpc_for_grpc_clients_and_http_for_others() {
    let grpc = failure_response(Failure::Timeout, true);
    assert_eq!(grpc.status(), StatusCode::OK);
    assert_eq!(grpc.headers()["grpc-status"], "4");
    assert_eq!(grpc.headers()[ERROR_HEADER], "timeout");
    let http = failure_response(Failure::NoBackend, false);
    assert_eq!(http.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(http.headers()[ERROR_HEADER], "no_backend");
}

#[test]
fn hop_by_hop_headers_are_not_forwarded_but_te_trailers_is() {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("connection", "keep-alive"),
        ("keep-alive", "5"),
        ("te", "trailers"),
        ("x-app", "1"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    strip_hop_by_hop(&mut h, false);
    let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    assert_eq!(left, ["te", "x-app"]);
}

/// A dialler for clients that never open a connection.
struct NoDial;

impl Dial for NoDial {
    fn open(
        self: Arc<Self>,
        _: Arc<Workload>,
        _: PodNetns,
        _: IpAddr,
        _: SocketAddr,
    ) -> BoxFuture<'static, io::Result<BoxedStream>> {
        Box::pin(async { Err(io::Error::other("not dialled")) })
    }
}

#[test]
fn a_pods_clients_and_its_namespace_are_let_go_once_no_connection_has_used_them_for_a_while() {
    let router = Router::new(
        crate::metrics::RequestMetrics::new(&mut prometheus_client::registry::Registry::default()),
        Arc::default(),
        Arc::default(),
        crate::telemetry::Telemetry::default(),
        "cluster.local".into(),
    );
    let dial: Arc<dyn Dial> = Arc::new(NoDial);
    let ip: IpAddr = "10.244.0.5".parse().unwrap();
    let pod = |uid: &str| {
        Arc::new(Workload {
            uid: uid.into(),
            ..crate::fixtures::workload("client", "client", "10.244.0.5", true)
        })
    };
    let netns = || -> PodNetns { Arc::new(std::fs::File::open("/dev/null").unwrap()) };
    let (ended_ns, held_ns) = (netns(), netns());
    let (ended, ended_key) = router.clients(&dial, &pod("ended"), &ended_ns, ip);
    let (held, _) = router.clients(&dial, &pod("held"), &held_ns, ip);
    // The same pod on the same worker gets the same clients.
    let (again, _) = router.clients(&dial, &pod("held"), &held_ns, ip);
    assert!(Arc::ptr_eq(&held, &again));
    drop((ended, again));
    router.done_with(&ended_key);
    let started = Instant::now();
    let pods = |router: &Router| {
        let pools = router.clients.lock().unwrap();
        let mut uids: Vec<String> = pools.by_pod.keys().map(|k| k.0.clone()).collect();
        uids.sort_unstable();
        uids
    };

    // Unused for less than the idle time: kept.
    router
        .clients
        .lock()
        .unwrap()
        .sweep(started + HTTP2_POOL_IDLE / 2);
    assert_eq!(pods(&router), ["shop/client/ended", "shop/client/held"]);
    // Past it: the clients no connection holds are let go, and the pod's
    // namespace is closed with them.
    router
        .clients
        .lock()
        .unwrap()
        .sweep(started + HTTP2_POOL_IDLE * 2);
    assert_eq!(pods(&router), ["shop/client/held"]);
    assert_eq!(Arc::strong_count(&ended_ns), 1, "only the test holds it");
    assert!(Arc::strong_count(&held_ns) > 1);
    drop(held);
}
