//! Inbound authorization: who the stream says it is against who the source
//! address is, then the policies (deny wins, allow narrows).

use std::{sync::Arc, time::Duration};

use lacewing_tunnel::Peer;

use crate::{fixtures::*, testing::Fixed};

/// web-0 (10.244.1.10) is meshed here; db-0 (10.244.1.11) is here but not
/// meshed; 10.244.0.5 is shop/client on n0, 10.244.0.6 other/x on n0.
fn state(policies: Vec<lacewing_core::model::authorization::Policy>) -> Arc<Fixed> {
    Arc::new(Fixed::new(
        vec![
            workload("web", "web", "10.244.1.10", true),
            workload("db", "db", "10.244.1.11", false),
        ],
        vec![
            peer("10.244.0.5", "shop", "client", "n0"),
            peer("10.244.0.6", "other", "x", "n0"),
        ],
        policies,
    ))
}

fn from(identity: &str, source: &str) -> Peer {
    Peer {
        identity: identity.into(),
        source: Some(source.parse().unwrap()),
    }
}

fn web(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new("10.244.1.10".parse().unwrap(), port)
}

#[test]
fn with_no_policy_a_proven_source_is_allowed() {
    let proxy = proxy(state(vec![]), Duration::ZERO);
    let workload = proxy
        .inbound
        .authorize(&from(CLIENT, "10.244.0.5"), web(80))
        .unwrap();
    assert_eq!(workload.name, "web");
}

#[test]
fn a_certificate_that_is_not_the_source_address_is_refused() {
    let proxy = proxy(state(vec![]), Duration::ZERO);
    // 10.244.0.6 is other/x, but the certificate says shop/client.
    let refusal = proxy
        .inbound
        .authorize(&from(CLIENT, "10.244.0.6"), web(80))
        .unwrap_err();
    assert_eq!((refusal.status, refusal.reason), (403, "identity_mismatch"));
    assert_eq!(
        refusal.detail,
        "the certificate says spiffe://cluster.local/ns/shop/sa/client but source 10.244.0.6 is spiffe://cluster.local/ns/other/sa/x"
    );
    let unknown = proxy
        .inbound
        .authorize(&from(CLIENT, "10.244.0.99"), web(80))
        .unwrap_err();
    assert_eq!(unknown.reason, "identity_mismatch");
    let no_source = Peer {
        identity: CLIENT.into(),
        source: None,
    };
    assert_eq!(
        proxy
            .inbound
            .authorize(&no_source, web(80))
            .unwrap_err()
            .reason,
        "no_source"
    );
}

#[test]
fn only_meshed_pods_here_are_destinations() {
    let proxy = proxy(state(vec![]), Duration::ZERO);
    let not_meshed = proxy
        .inbound
        .authorize(
            &from(CLIENT, "10.244.0.5"),
            "10.244.1.11:80".parse().unwrap(),
        )
        .unwrap_err();
    assert_eq!(
        (not_meshed.status, not_meshed.reason),
        (403, "destination_not_meshed")
    );
    let elsewhere = proxy
        .inbound
        .authorize(
            &from(CLIENT, "10.244.0.5"),
            "10.244.2.10:80".parse().unwrap(),
        )
        .unwrap_err();
    assert_eq!(
        (elsewhere.status, elsewhere.reason),
        (404, "unknown_destination")
    );
}

#[test]
fn deny_wins_over_allow() {
    let allow = policy(
        "allow-shop",
        "{action: Allow, rules: [{from: [{namespaces: [shop]}]}]}",
    );
    let deny = policy(
        "deny-client",
        "{action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}]}]}",
    );
    let proxy = proxy(state(vec![allow, deny]), Duration::ZERO);
    let refusal = proxy
        .inbound
        .authorize(&from(CLIENT, "10.244.0.5"), web(80))
        .unwrap_err();
    assert_eq!((refusal.status, refusal.reason), (403, "policy_denied"));
    assert_eq!(refusal.policy.as_deref(), Some("shop/deny-client"));
}

#[test]
fn allow_narrows_to_what_it_names() {
    let allow = policy(
        "allow-other-on-80",
        "{action: Allow, rules: [{from: [{namespaces: [other]}], to: [{ports: [80]}]}]}",
    );
    let proxy = proxy(state(vec![allow]), Duration::ZERO);
    assert!(
        proxy
            .inbound
            .authorize(&from(OTHER, "10.244.0.6"), web(80))
            .is_ok()
    );
    let wrong_port = proxy
        .inbound
        .authorize(&from(OTHER, "10.244.0.6"), web(81))
        .unwrap_err();
    assert_eq!(wrong_port.policy.as_deref(), Some("shop/allow-other-on-80"));
    let not_named = proxy
        .inbound
        .authorize(&from(CLIENT, "10.244.0.5"), web(80))
        .unwrap_err();
    assert_eq!(not_named.reason, "policy_denied");
}
