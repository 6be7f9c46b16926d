//! Per-request endpoint choice: power of two choices over peak-EWMA
//! latency (Linkerd's default). Two endpoints are drawn at random and the
//! one with the lower cost wins, cost being its latency estimate times its
//! requests in flight plus one. The estimate jumps up to a slower sample at
//! once (the peak) and decays toward faster ones with a 10 s time constant,
//! so an endpoint that slows down is avoided at once and tried again soon
//! after it recovers. A failed request (no answer, or a 5xx) counts as a
//! slow one, so an endpoint that fails fast does not attract the load.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lacewing_core::model::services::BackendEntry;

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

/// The latency state of every endpoint requests went to.
#[derive(Debug, Default)]
pub struct Balancer {
    stats: Arc<Mutex<HashMap<SocketAddr, Stats>>>,
}

impl Balancer {
    /// One of `endpoints` (avoiding `avoid`, the one a retry failed on,
    /// when there is another), counted as in flight until
    /// [`Pending::done`].
    pub fn pick(&self, endpoints: &[BackendEntry], avoid: Option<SocketAddr>) -> Option<Pending> {
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
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
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

    fn endpoints(n: u8) -> Vec<BackendEntry> {
        (1..=n)
            .map(|i| BackendEntry {
                addr: SocketAddr::from(([10, 0, 0, i], 80)),
                weight: 1,
            })
            .collect()
    }

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
}
