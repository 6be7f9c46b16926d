use super::*;
use crate::api::traffic::{ConsistentHash, LoadBalancer, Retries, TrafficPolicySpec};

fn spec(yaml: &str) -> TrafficPolicySpec {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn defaults_are_linkerd_s_budget_and_envoy_s_ejection() {
    let p = compile(
        "shop",
        "web",
        &spec("targetRef: {name: web}\nretries: {attempts: 2}\noutlierDetection: {}\n"),
    )
    .unwrap();
    let r = p.retry.clone().unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(r.budget.percent, 0.2);
    assert_eq!(r.budget.min_per_second, 10);
    assert!(r.on.connect() && r.on.no_answer());
    assert!(r.on.answer(503, None) && r.on.answer(200, Some(14)));
    assert!(!r.on.answer(500, None), "500 is not a gateway error");
    let o = p.outlier.unwrap();
    assert_eq!(
        (o.consecutive_5xx, o.base_ejection, o.max_ejection_percent),
        (5, Duration::from_secs(30), 50)
    );
    assert!(p.needs_requests());
}

#[test]
fn retry_on_names_statuses_and_grpc_codes() {
    let on = RetryOn::parse(&["5xx".into(), "409".into(), "resource-exhausted".into()]).unwrap();
    assert!(on.answer(500, None) && on.answer(409, None) && on.answer(200, Some(8)));
    assert!(!on.answer(404, None) && !on.answer(200, Some(14)));
    let err = RetryOn::parse(&["sometimes".into()]).unwrap_err();
    assert_eq!(err.field, "spec.retries.retryOn");
    assert!(err.what.contains("`sometimes` is not one of 5xx"), "{err}");
}

#[test]
fn bad_values_name_their_field() {
    let cases = [
        (
            "timeout: soon",
            "spec.timeout: `soon` is not a duration such as 500ms, 10s or 1m30s",
        ),
        (
            "fault: {abort: {percent: 50}}",
            "spec.fault.abort: set exactly one of httpStatus and grpcStatus",
        ),
        (
            "fault: {abort: {percent: 150, httpStatus: 503}}",
            "spec.fault.abort.percent: 150 is not a percentage from 0 to 100",
        ),
        (
            "circuitBreaker: {maxRequests: 0}",
            "spec.circuitBreaker: maxConnections and maxRequests must be at least 1 (0 would refuse every request)",
        ),
        (
            "loadBalancer: {algorithm: Maglev, maglevTableSize: 100}",
            "spec.loadBalancer.maglevTableSize: 100 is not a prime between 2 and 131071 (16381 when absent)",
        ),
        (
            "loadBalancer: {algorithm: ConsistentHash}",
            "spec.loadBalancer.consistentHash: set exactly one of header and cookie",
        ),
        (
            "rateLimit: {requestsPerSecond: 10, overrides: [{serviceAccount: batch, requestsPerSecond: 1}]}",
            "spec.rateLimit.overrides: serviceAccount `batch` must be namespace/name",
        ),
        (
            "retries: {attempts: 1, backoff: 1s, maxBackoff: 100ms}",
            "spec.retries.maxBackoff: 100ms is shorter than backoff (1s)",
        ),
    ];
    for (yaml, want) in cases {
        let err = compile(
            "shop",
            "p",
            &spec(&format!("targetRef: {{name: web}}\n{yaml}\n")),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), want, "{yaml}");
    }
}

#[test]
fn a_kernel_algorithm_alone_does_not_route_requests() {
    let s = TrafficPolicySpec {
        target_ref: crate::api::traffic::ServiceRef {
            name: "web".into(),
            port: None,
        },
        load_balancer: Some(LoadBalancer {
            algorithm: crate::api::traffic::LbAlgorithm::Maglev,
            maglev_table_size: None,
            consistent_hash: None,
        }),
        ..spec("targetRef: {name: web}")
    };
    let p = compile("shop", "p", &s).unwrap();
    assert!(!p.needs_requests());
    assert_eq!(
        p.kernel_algorithm,
        Some(crate::model::services::Algorithm::maglev_default())
    );
    let hashed = TrafficPolicySpec {
        load_balancer: Some(LoadBalancer {
            algorithm: crate::api::traffic::LbAlgorithm::ConsistentHash,
            maglev_table_size: None,
            consistent_hash: Some(ConsistentHash {
                header: Some("x-user".into()),
                cookie: None,
            }),
        }),
        ..s
    };
    let p = compile("shop", "p", &hashed).unwrap();
    assert_eq!(
        p.balance,
        Balance::Header(http::HeaderName::from_static("x-user"))
    );
    assert!(p.needs_requests());
}

#[test]
fn a_port_s_policy_wins_over_the_service_s() {
    let policy = |name: &str, port: Option<u16>, attempts: u32| AcceptedTraffic {
        namespace: "shop".into(),
        name: name.into(),
        spec: TrafficPolicySpec {
            target_ref: crate::api::traffic::ServiceRef {
                name: "web".into(),
                port,
            },
            retries: Some(Retries {
                attempts,
                per_try_timeout: None,
                retry_on: Vec::new(),
                backoff: None,
                max_backoff: None,
                budget: None,
            }),
            ..spec("targetRef: {name: web}")
        },
    };
    let table = PolicyTable::build(&[policy("all", None, 1), policy("eighty", Some(80), 3)]);
    let svc = ("shop".to_owned(), "web".to_owned());
    assert_eq!(table.get(&svc, 80).unwrap().policy, "shop/eighty");
    assert_eq!(table.get(&svc, 81).unwrap().policy, "shop/all");
    assert!(table.get(&("shop".into(), "db".into()), 80).is_none());
}
