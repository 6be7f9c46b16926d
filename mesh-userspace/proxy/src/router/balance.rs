//! Per-request endpoint choice: power of two choices over peak-EWMA
//! latency (Linkerd's default). Two endpoints are drawn at random and the
//! one with the lower cost wins, cost being its latency estimate times its
//! requests in flight plus one. The estimate jumps up to a slower sample at
//! once (the peak) and decays toward faster ones with a 10 s time constant,
//! so an endpoint that slows down is avoided at once and tried again soon
//! after it recovers. A failed request (no answer, or a 5xx) counts as a
//! slow one, so an endpoint that fails fast does not attract the load.
//!
//! A TrafficPolicy may choose instead round robin (per Service, in turn) or
//! consistent hashing on a header or cookie: rendezvous hashing (the
//! endpoint with the highest hash of key and address), so removing one
//! endpoint moves only the keys that were on it. A request without the key
//! goes by peak EWMA.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lacewing_core::model::services::{BackendEntry, ServiceId};

/// The estimate of an endpoint never measured.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// How fast the estimate forgets.
const DECAY: Duration = Duration::from_secs(10);
/// What a failure weighs, as a latency sample.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Stats {
    /// Nanoseconds.
    estimate: f64,
    stamp: Instant,
    pending: u32,
}

/// The latency state of every endpoint requests went to, and the round
/// robin turns by Service.
#[derive(Debug, Default)]
pub struct Balancer {
    stats: Arc<Mutex<HashMap<SocketAddr, Stats>>>,
    turns: Mutex<HashMap<ServiceId, usize>>,
}

/// How to choose among a Service's endpoints.
#[derive(Clone, Copy, Debug)]
pub enum Choice<'a> {
    PeakEwma,
    /// In turn, per Service.
    RoundRobin(&'a ServiceId),
    /// By this key's rendezvous hash.
    Hash(&'a [u8]),
}

impl Balancer {
    /// One of `endpoints` (avoiding `avoid`, the one a retry failed on,
    /// when there is another), counted as in flight until
    /// [`Pending::done`].
    pub fn pick(&self, endpoints: &[BackendEntry], avoid: Option<SocketAddr>) -> Option<Pending> {
        self.choose(endpoints, avoid, Choice::PeakEwma)
    }

    /// As [`pick`](Self::pick), choosing as `how` says.
    pub fn choose(
        &self,
        endpoints: &[BackendEntry],
        avoid: Option<SocketAddr>,
        how: Choice<'_>,
    ) -> Option<Pending> {
        let candidates: Vec<SocketAddr> = endpoints
            .iter()
            .map(|e| e.addr)
            .filter(|a| Some(*a) != avoid)
            .collect();
        let candidates = if candidates.is_empty() {
            endpoints.iter().map(|e| e.addr).collect()
        } else {
            candidates
        };
        let chosen = match (candidates.len(), how) {
            (0, _) => return None,
            (1, _) => candidates[0],
            (n, Choice::RoundRobin(service)) => {
                let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
                let turn = turns.entry(service.clone()).or_default();
                *turn = turn.wrapping_add(1);
                candidates[*turn % n]
            }
            (_, Choice::Hash(key)) => *candidates
                .iter()
                .max_by_key(|addr| rendezvous(key, addr))
                .expect("not empty"),
            (n, Choice::PeakEwma) => {
                let a = fastrand::usize(0..n);
                let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
                let stats = self.lock();
                let cost = |addr: &SocketAddr| {
                    stats.get(addr).map_or(DEFAULT_RTT.as_nanos() as f64, |s| {
                        s.decayed(Instant::now()) * f64::from(s.pending + 1)
                    })
                };
                if cost(&candidates[b]) < cost(&candidates[a]) {
                    candidates[b]
                } else {
                    candidates[a]
                }
            }
        };
        self.lock()
            .entry(chosen)
            .or_insert_with(|| Stats {
                estimate: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
                pending: 0,
            })
            .pending += 1;
        Some(Pending {
            stats: Arc::clone(&self.stats),
            addr: chosen,
            started: Instant::now(),
            finished: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Stats>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The rendezvous weight of `addr` for `key` (FNV-1a over both, then
/// mixed: stable across processes and releases, unlike std's hasher).
fn rendezvous(key: &[u8], addr: &SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let addr = addr.to_string();
    for b in key.iter().chain([0u8].iter()).chain(addr.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV alone leaves close inputs close.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Stats {
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        let floor = DEFAULT_RTT.as_nanos() as f64 / 10.0;
        (self.estimate * (-elapsed / DECAY.as_secs_f64()).exp()).max(floor)
    }

    fn sample(&mut self, rtt: f64, now: Instant) {
        let decayed = self.decayed(now);
        self.estimate = if rtt > decayed {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            decayed * w + rtt * (1.0 - w)
        };
        self.stamp = now;
    }
}

/// A request in flight to one endpoint.
#[derive(Debug)]
pub struct Pending {
    stats: Arc<Mutex<HashMap<SocketAddr, Stats>>>,
    addr: SocketAddr,
    started: Instant,
    finished: bool,
}

impl Pending {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records the outcome (a failure weighs as a slow answer).
    pub fn done(mut self, ok: bool) {
        self.finish(ok);
    }

    fn finish(&mut self, ok: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let now = Instant::now();
        let rtt = if ok {
            now.duration_since(self.started)
        } else {
            FAILURE_PENALTY
        };
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stats.get_mut(&self.addr) {
            s.pending = s.pending.saturating_sub(1);
            s.sample(rtt.as_nanos() as f64, now);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Dropped unfinished (the request was cancelled): not a sample.
        if !self.finished {
            self.finished = true;
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = stats.get_mut(&self.addr) {
                s.pending = s.pending.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::router::test_endpoints as endpoints;

    #[test]
    fn a_failing_endpoint_is_avoided_and_a_retry_goes_elsewhere() {
        let b = Balancer::default();
        let eps = endpoints(2);
        // Endpoint 1 fails once: with two endpoints, P2C always compares
        // both, so every later pick goes to endpoint 2 while 1's penalty
        // has not decayed.
        let first = b.pick(&eps[..1], None).unwrap();
        assert_eq!(first.addr(), eps[0].addr);
        first.done(false);
        for _ in 0..50 {
            let p = b.pick(&eps, None).unwrap();
            assert_eq!(p.addr(), eps[1].addr);
            p.done(true);
        }
        // A retry avoids the endpoint it failed on.
        let p = b.pick(&eps, Some(eps[1].addr)).unwrap();
        assert_eq!(p.addr(), eps[0].addr);
    }

    #[test]
    fn requests_in_flight_spread_the_load() {
        let b = Balancer::default();
        let eps = endpoints(2);
        let held: Vec<Pending> = (0..10).map(|_| b.pick(&eps, None).unwrap()).collect();
        let on_first = held.iter().filter(|p| p.addr() == eps[0].addr).count();
        assert_eq!(on_first, 5, "equal costs alternate with what is in flight");
        assert!(b.pick(&[], None).is_none());
    }

    #[test]
    fn round_robin_takes_each_endpoint_in_turn() {
        let b = Balancer::default();
        let eps = endpoints(3);
        let svc = ("shop".to_owned(), "web".to_owned());
        let mut seen: Vec<SocketAddr> = (0..6)
            .map(|_| {
                b.choose(&eps, None, Choice::RoundRobin(&svc))
                    .unwrap()
                    .addr()
            })
            .collect();
        assert_eq!(seen[..3], seen[3..]);
        seen.truncate(3);
        seen.sort();
        assert_eq!(seen, eps.iter().map(|e| e.addr).collect::<Vec<_>>());
    }

    #[test]
    fn a_key_stays_on_its_endpoint_and_only_a_removed_endpoint_s_keys_move() {
        let b = Balancer::default();
        let eps = endpoints(5);
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let place = |eps: &[BackendEntry], key: &str| {
            b.choose(eps, None, Choice::Hash(key.as_bytes()))
                .unwrap()
                .addr()
        };
        let before: Vec<SocketAddr> = keys.iter().map(|k| place(&eps, k)).collect();
        assert!(
            keys.iter()
                .zip(&before)
                .all(|(k, at)| place(&eps, k) == *at)
        );
        let per_endpoint =
            |list: &[SocketAddr], e: &BackendEntry| list.iter().filter(|a| **a == e.addr).count();
        assert!(
            eps.iter().all(|e| per_endpoint(&before, e) > 15),
            "{before:?}"
        );
        let fewer = [&eps[..2], &eps[3..]].concat();
        for (k, at) in keys.iter().zip(&before) {
            let now = place(&fewer, k);
            if *at == eps[2].addr {
                assert_ne!(now, eps[2].addr);
            } else {
                assert_eq!(now, *at, "{k} moved though its endpoint stayed");
            }
        }
    }
}
