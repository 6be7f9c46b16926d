//! What a client's node keeps per destination Service for its
//! TrafficPolicy: endpoints ejected by outlier detection, the circuit
//! breaker's counts, and the retry budget. State is kept per Service (the
//! policy's parameters are read per request, so a changed policy applies to
//! the next request); a Service's entry goes when no request uses it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use lacewing_core::model::{
    services::{BackendEntry, ServiceId},
    traffic::{Breaker, Budget, Outlier},
};
use tower::retry::budget::{Budget as _, TpsBudget};

/// How a request to an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered, not 5xx.
    Ok,
    /// 500, 501, 505 and up.
    ServerError,
    /// 502, 503, 504, a failure to connect, or no answer.
    GatewayError,
}

impl Outcome {
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Self::GatewayError,
            500..=599 => Self::ServerError,
            _ => Self::Ok,
        }
    }
}

/// One endpoint's passive health.
#[derive(Debug)]
struct Health {
    /// Consecutive 5xx (gateway errors included), and gateway errors.
    failures: u32,
    gateway: u32,
    /// When the current run of failures began.
    first_failure: Instant,
    /// Times ejected (decays by one per `interval` of health after it
    /// returns).
    ejections: u32,
    ejected_until: Option<Instant>,
    /// When it last came back (or last decayed): within `interval` of it, one
    /// failure ejects it again.
    returned: Option<Instant>,
}

impl Health {
    fn new(now: Instant) -> Self {
        Self {
            failures: 0,
            gateway: 0,
            first_failure: now,
            ejections: 0,
            ejected_until: None,
            returned: None,
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }
}

/// An endpoint outlier detection took out, as `lacewing routes` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ejected {
    pub endpoint: SocketAddr,
    pub ejections: u32,
    pub remaining: Duration,
}

/// Passive health of the endpoints of every Service with outlier
/// detection.
#[derive(Debug, Default)]
pub struct Outliers {
    services: Mutex<HashMap<ServiceId, HashMap<SocketAddr, Health>>>,
}

impl Outliers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceId, HashMap<SocketAddr, Health>>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `endpoints` without those ejected now (all of them if every one is:
    /// never none while any exists).
    pub fn healthy(&self, service: &ServiceId, endpoints: &[BackendEntry]) -> Vec<BackendEntry> {
        let now = Instant::now();
        let mut services = self.lock();
        let Some(health) = services.get_mut(service) else {
            return endpoints.to_vec();
        };
        let mut out = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            match health.get_mut(&e.addr) {
                Some(h) if h.ejected(now) => continue,
                Some(h) if h.ejected_until.is_some() => {
                    // Its time is up: back, on probation.
                    h.ejected_until = None;
                    h.returned = Some(now);
                    h.failures = 0;
                    h.gateway = 0;
                    out.push(*e);
                }
                _ => out.push(*e),
            }
        }
        if out.is_empty() {
            endpoints.to_vec()
        } else {
            out
        }
    }

    /// Records `outcome` of a request to `endpoint` of `service` (one of
    /// `total` endpoints); true when this ejected it.
    pub fn record(
        &self,
        service: &ServiceId,
        config: &Outlier,
        endpoint: SocketAddr,
        outcome: Outcome,
        total: usize,
    ) -> bool {
        let now = Instant::now();
        let mut services = self.lock();
        let health = services.entry(service.clone()).or_default();
        let h = health.entry(endpoint).or_insert_with(|| Health::new(now));
        if h.ejected(now) {
            // An answer to a request sent before the ejection.
            return false;
        }
        if outcome == Outcome::Ok {
            h.failures = 0;
            h.gateway = 0;
            if let Some(back) = h.returned
                && now.duration_since(back) >= config.interval
            {
                h.ejections = h.ejections.saturating_sub(1);
                h.returned = (h.ejections > 0).then_some(now);
            }
            return false;
        }
        if h.failures == 0 || now.duration_since(h.first_failure) > config.interval {
            h.first_failure = now;
            h.failures = 0;
            h.gateway = 0;
        }
        h.failures += 1;
        if outcome == Outcome::GatewayError {
            h.gateway += 1;
        }
        let on_probation = h
            .returned
            .is_some_and(|back| h.ejections > 0 && now.duration_since(back) < config.interval);
        let tripped = on_probation
            || (config.consecutive_5xx > 0 && h.failures >= config.consecutive_5xx)
            || (config.consecutive_gateway > 0 && h.gateway >= config.consecutive_gateway);
        if !tripped {
            return false;
        }
        // Never more than the allowed share ejected at once, rounded down
        // (at 50%: none of one, one of two or three).
        let allowed = total * config.max_ejection_percent as usize / 100;
        let ejected_now = health.values().filter(|h| h.ejected(now)).count();
        if ejected_now + 1 > allowed {
            return false;
        }
        let h = health.get_mut(&endpoint).expect("inserted above");
        h.ejections += 1;
        h.ejected_until = Some(now + config.base_ejection * h.ejections);
        h.returned = None;
        h.failures = 0;
        h.gateway = 0;
        tracing::info!(
            service = %format!("{}/{}", service.0, service.1),
            %endpoint,
            ejections = h.ejections,
            "endpoint ejected by outlier detection"
        );
        true
    }

    /// The endpoints ejected now, by Service.
    pub fn ejected(&self) -> Vec<(ServiceId, Ejected)> {
        let now = Instant::now();
        let services = self.lock();
        let mut out: Vec<(ServiceId, Ejected)> = services
            .iter()
            .flat_map(|(service, health)| {
                health.iter().filter_map(move |(addr, h)| {
                    h.ejected_until.filter(|t| *t > now).map(|until| {
                        (
                            service.clone(),
                            Ejected {
                                endpoint: *addr,
                                ejections: h.ejections,
                                remaining: until - now,
                            },
                        )
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.1.endpoint).cmp(&(&b.0, b.1.endpoint)));
        out
    }
}

/// Why the circuit breaker refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `maxRequests` in flight.
    Requests,
    /// `maxConnections` busy and `maxPendingRequests` waiting.
    Pending,
}

/// One Service's counts under one set of limits.
#[derive(Debug)]
struct Gate {
    limits: Breaker,
    in_flight: AtomicU32,
    waiting: AtomicU32,
    connections: Option<Arc<tokio::sync::Semaphore>>,
}

/// What a request admitted by a circuit breaker holds until its response
/// ends.
#[derive(Debug)]
pub struct Admitted {
    gate: Arc<Gate>,
    _connection: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Circuit breakers per destination Service.
#[derive(Debug, Default)]
pub struct Breakers {
    gates: Mutex<HashMap<ServiceId, Arc<Gate>>>,
}

impl Breakers {
    /// Admits a request to `service` under `limits` (`http1`: it needs a
    /// connection of its own for its whole exchange), waiting for a
    /// connection when `maxConnections` are busy; refuses at once past
    /// `maxRequests` or `maxPendingRequests`.
    pub async fn admit(
        &self,
        service: &ServiceId,
        limits: &Breaker,
        http1: bool,
    ) -> Result<Admitted, Refused> {
        let gate = {
            let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
            // Requests that no longer hold a gate let it go; a changed
            // policy starts counting afresh.
            gates.retain(|_, g| Arc::strong_count(g) > 1);
            let gate = gates
                .entry(service.clone())
                .or_insert_with(|| Arc::new(Gate::new(*limits)));
            if gate.limits != *limits {
                *gate = Arc::new(Gate::new(*limits));
            }
            Arc::clone(gate)
        };
        let in_flight = gate.in_flight.fetch_add(1, Ordering::AcqRel);
        // From here the count is the Admitted's (or dropped with it).
        let mut admitted = Admitted {
            gate: Arc::clone(&gate),
            _connection: None,
        };
        if limits.max_requests.is_some_and(|max| in_flight >= max) {
            return Err(Refused::Requests);
        }
        if let (true, Some(connections)) = (http1, &gate.connections) {
            let permit = match Arc::clone(connections).try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let waiting = gate.waiting.fetch_add(1, Ordering::AcqRel);
                    if limits.max_pending.is_some_and(|max| waiting >= max) {
                        gate.waiting.fetch_sub(1, Ordering::AcqRel);
                        return Err(Refused::Pending);
                    }
                    let p = Arc::clone(connections).acquire_owned().await;
                    gate.waiting.fetch_sub(1, Ordering::AcqRel);
                    p.map_err(|_| Refused::Pending)?
                }
            };
            admitted._connection = Some(permit);
        }
        Ok(admitted)
    }
}

impl Breakers {
    /// The requests to `service` in flight now, and those waiting for a
    /// connection (as `lacewing explain` shows a circuit): `None` when no
    /// request holds its breaker.
    pub fn load(&self, service: &ServiceId) -> Option<(u32, u32)> {
        let gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.get(service).map(|g| {
            (
                g.in_flight.load(Ordering::Acquire),
                g.waiting.load(Ordering::Acquire),
            )
        })
    }

    /// Requests waiting for a connection to `service`.
    #[cfg(test)]
    fn waiting(&self, service: &ServiceId) -> u32 {
        let gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates
            .get(service)
            .map_or(0, |g| g.waiting.load(Ordering::Acquire))
    }
}

impl Gate {
    fn new(limits: Breaker) -> Self {
        Self {
            limits,
            in_flight: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            connections: limits
                .max_connections
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
        }
    }
}

/// Retry budgets per destination Service (tower's: deposits per request,
/// withdrawals per retry, a floor per second).
#[derive(Default)]
pub struct Budgets {
    budgets: Mutex<HashMap<ServiceId, (Budget, Arc<TpsBudget>)>>,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Budgets")
    }
}

/// One Service's budget, for one request.
pub struct RetryBudget(Arc<TpsBudget>);

impl RetryBudget {
    /// Whether one more retry fits (taking it from the budget).
    pub fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

impl Budgets {
    /// The budget of `service` under `config`, with this request deposited.
    pub fn request(&self, service: &ServiceId, config: &Budget) -> RetryBudget {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let entry = budgets
            .entry(service.clone())
            .or_insert_with(|| (*config, new_budget(config)));
        if entry.0 != *config {
            *entry = (*config, new_budget(config));
        }
        entry.1.deposit();
        RetryBudget(Arc::clone(&entry.1))
    }
}

fn new_budget(config: &Budget) -> Arc<TpsBudget> {
    Arc::new(TpsBudget::new(
        config.ttl,
        config.min_per_second,
        config.percent as f32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::router::test_endpoints as endpoints;

    const CONFIG: Outlier = Outlier {
        consecutive_5xx: 3,
        consecutive_gateway: 0,
        interval: Duration::from_secs(10),
        base_ejection: Duration::from_millis(50),
        max_ejection_percent: 50,
    };

    #[test]
    fn consecutive_failures_eject_and_the_endpoint_returns_after_its_time() {
        let outliers = Outliers::default();
        let svc = ("shop".to_owned(), "web".to_owned());
        let eps = endpoints(3);
        let bad = eps[0].addr;
        assert!(!outliers.record(&svc, &CONFIG, bad, Outcome::GatewayError, 3));
        assert!(!outliers.record(&svc, &CONFIG, bad, Outcome::ServerError, 3));
        // A success in between starts the count again.
        assert!(!outliers.record(&svc, &CONFIG, bad, Outcome::Ok, 3));
        assert!(!outliers.record(&svc, &CONFIG, bad, Outcome::ServerError, 3));
        assert!(!outliers.record(&svc, &CONFIG, bad, Outcome::ServerError, 3));
        assert!(outliers.record(&svc, &CONFIG, bad, Outcome::ServerError, 3));
        assert_eq!(outliers.healthy(&svc, &eps), eps[1..].to_vec());
        assert_eq!(outliers.ejected()[0].1.ejections, 1);
        // A second endpoint may not go too: at most 50% of 3 (one).
        for _ in 0..3 {
            assert!(!outliers.record(&svc, &CONFIG, eps[1].addr, Outcome::ServerError, 3));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while outliers.healthy(&svc, &eps).len() != 3 {
            assert!(Instant::now() < deadline, "never returned");
            std::thread::yield_now();
        }
        // Back on probation: one failure ejects it again, for twice as long.
        assert!(outliers.record(&svc, &CONFIG, bad, Outcome::GatewayError, 3));
        assert_eq!(outliers.ejected()[0].1.ejections, 2);
        assert!(outliers.ejected()[0].1.remaining > Duration::from_millis(50));
    }

    #[test]
    fn the_last_endpoints_are_never_ejected() {
        let outliers = Outliers::default();
        let svc = ("shop".to_owned(), "one".to_owned());
        let eps = endpoints(1);
        for _ in 0..10 {
            assert!(!outliers.record(&svc, &CONFIG, eps[0].addr, Outcome::ServerError, 1));
        }
        assert_eq!(outliers.healthy(&svc, &eps), eps);
    }

    #[tokio::test]
    async fn the_breaker_refuses_past_max_requests_and_counts_down_as_responses_end() {
        let breakers = Breakers::default();
        let svc = ("shop".to_owned(), "web".to_owned());
        let limits = Breaker {
            max_connections: None,
            max_pending: None,
            max_requests: Some(2),
        };
        let a = breakers.admit(&svc, &limits, false).await.unwrap();
        let _b = breakers.admit(&svc, &limits, false).await.unwrap();
        assert_eq!(
            breakers.admit(&svc, &limits, false).await.unwrap_err(),
            Refused::Requests
        );
        drop(a);
        assert!(breakers.admit(&svc, &limits, false).await.is_ok());
    }

    #[tokio::test]
    async fn http1_requests_wait_for_a_connection_up_to_max_pending() {
        let breakers = Arc::new(Breakers::default());
        let svc = ("shop".to_owned(), "web".to_owned());
        let limits = Breaker {
            max_connections: Some(1),
            max_pending: Some(1),
            max_requests: None,
        };
        let first = breakers.admit(&svc, &limits, true).await.unwrap();
        let waiter = {
            let (breakers, svc) = (Arc::clone(&breakers), svc.clone());
            tokio::spawn(async move { breakers.admit(&svc, &limits, true).await.map(|_| ()) })
        };
        // The second waits; a third finds the queue full.
        let deadline = Instant::now() + Duration::from_secs(5);
        while breakers.waiting(&svc) != 1 {
            assert!(Instant::now() < deadline, "the second never waited");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            breakers.admit(&svc, &limits, true).await.unwrap_err(),
            Refused::Pending
        );
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }

    #[test]
    fn the_budget_allows_its_share_of_retries_beyond_the_floor() {
        let budgets = Budgets::default();
        let svc = ("shop".to_owned(), "web".to_owned());
        let config = Budget {
            percent: 0.2,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        };
        let mut allowed = 0;
        for _ in 0..100 {
            if budgets.request(&svc, &config).withdraw() {
                allowed += 1;
            }
        }
        assert!((19..=20).contains(&allowed), "{allowed} of 100");
    }
}
