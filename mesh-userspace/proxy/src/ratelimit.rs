//! Local rate limits at the destination (a TrafficPolicy's `rateLimit`):
//! governor's GCRA limiters, one per pod endpoint the policy covers (as
//! Istio's local rate limit is per proxy, so per pod), keyed per source
//! identity when the policy says `perSource`, and one per override.
//! Limiters are rebuilt when the policy's quota changes.

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use lacewing_core::model::traffic::{self, RateLimit};

/// A keyed limiter's map is pruned of sources that have their whole quota
/// back once it holds this many.
const PRUNE_AT: usize = 4096;

/// One pod endpoint's limiters under one policy.
struct Limiters {
    config: RateLimit,
    shared: DefaultDirectRateLimiter,
    per_source: Option<DefaultKeyedRateLimiter<String>>,
    overrides: Vec<DefaultDirectRateLimiter>,
}

fn quota(q: traffic::Quota) -> Quota {
    let n = |v: u32| NonZeroU32::new(v.max(1)).expect("at least 1");
    Quota::per_second(n(q.per_second)).allow_burst(n(q.burst))
}

impl Limiters {
    fn new(config: &RateLimit) -> Self {
        Self {
            config: config.clone(),
            shared: RateLimiter::direct(quota(config.quota)),
            per_source: config
                .per_source
                .then(|| RateLimiter::keyed(quota(config.quota))),
            overrides: config
                .overrides
                .iter()
                .map(|(_, q)| RateLimiter::direct(quota(*q)))
                .collect(),
        }
    }
}

/// The limiters of every rate-limited pod endpoint on this node.
#[derive(Default)]
pub struct RateLimits {
    limiters: Mutex<HashMap<SocketAddr, Arc<Limiters>>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateLimits")
    }
}

impl RateLimits {
    /// Takes one request (or connection) to `dest` from `identity` under
    /// `config`; `Err` with how long until one would be allowed.
    pub fn check(
        &self,
        dest: SocketAddr,
        config: &RateLimit,
        identity: &str,
    ) -> Result<(), Duration> {
        let limiters = {
            let mut all = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
            let entry = all
                .entry(dest)
                .or_insert_with(|| Arc::new(Limiters::new(config)));
            if entry.config != *config {
                *entry = Arc::new(Limiters::new(config));
            }
            Arc::clone(entry)
        };
        let now = DefaultClock::default().now();
        let verdict = match (config.override_for(identity), &limiters.per_source) {
            (Some((i, _)), _) => limiters.overrides[i].check(),
            (None, Some(keyed)) => {
                if keyed.len() >= PRUNE_AT {
                    keyed.retain_recent();
                }
                keyed.check_key(&identity.to_owned())
            }
            (None, None) => limiters.shared.check(),
        };
        verdict.map_err(|not_until| not_until.wait_time_from(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_source: bool) -> RateLimit {
        RateLimit {
            quota: traffic::Quota {
                per_second: 1,
                burst: 3,
            },
            per_source,
            overrides: vec![(
                "/ns/shop/sa/batch".to_owned(),
                traffic::Quota {
                    per_second: 1,
                    burst: 1,
                },
            )],
        }
    }

    const POD: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
        80,
    );
    const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
    const B: &str = "spiffe://cluster.local/ns/shop/sa/b";

    #[test]
    fn a_burst_then_refusals_that_say_when_to_come_back() {
        let limits = RateLimits::default();
        for _ in 0..3 {
            assert!(limits.check(POD, &config(false), A).is_ok());
        }
        let wait = limits.check(POD, &config(false), B).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }

    #[test]
    fn per_source_clients_do_not_share_and_overrides_have_their_own_quota() {
        let limits = RateLimits::default();
        for _ in 0..3 {
            assert!(limits.check(POD, &config(true), A).is_ok());
        }
        assert!(limits.check(POD, &config(true), A).is_err());
        assert!(
            limits.check(POD, &config(true), B).is_ok(),
            "B has its own share"
        );
        let batch = "spiffe://cluster.local/ns/shop/sa/batch";
        assert!(limits.check(POD, &config(true), batch).is_ok());
        assert!(limits.check(POD, &config(true), batch).is_err(), "burst 1");
    }
}
