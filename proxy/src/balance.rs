//! Load balancing: which endpoint of a cluster takes the next request.
//!
//! The default is Linkerd's: power of two choices (P2C) over a peak-EWMA latency estimate
//! multiplied by the endpoint's pending requests. Round-robin, least-request (P2C over pending)
//! and random are options. The scoring and choice are pure functions of the endpoints' load and
//! the given random numbers and time; `Load` is the only shared state, updated with atomics so no
//! request waits on a lock.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// How a cluster spreads requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    PeakEwma,
    RoundRobin,
    LeastRequest,
    Random,
}

/// How fast old latency observations fade (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint with no observation yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A peak-EWMA round-trip estimate: a slower observation replaces the estimate at once, faster
/// ones pull it down exponentially with time (so an endpoint that was slow gets retried). The
/// first observation replaces the default prior outright.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RttEstimate {
    pub rtt_ns: f64,
    pub at: Instant,
    /// Still the default prior: nothing observed yet.
    pub prior: bool,
}

impl RttEstimate {
    /// The estimate after observing `rtt` at `now`.
    pub fn observe(self, rtt: Duration, now: Instant, decay: Duration) -> RttEstimate {
        let rtt_ns = rtt.as_nanos() as f64;
        if self.prior || rtt_ns > self.rtt_ns {
            return RttEstimate { rtt_ns, at: now, prior: false };
        }
        let w = weight(now.saturating_duration_since(self.at), decay);
        RttEstimate { rtt_ns: self.rtt_ns * w + rtt_ns * (1.0 - w), at: now, prior: false }
    }

    /// The estimate at `now`, decayed toward zero since the last observation.
    pub fn at(self, now: Instant, decay: Duration) -> f64 {
        self.rtt_ns * weight(now.saturating_duration_since(self.at), decay)
    }
}

fn weight(elapsed: Duration, decay: Duration) -> f64 {
    (-(elapsed.as_nanos() as f64) / decay.as_nanos().max(1) as f64).exp()
}

/// Peak-EWMA cost: the latency estimate scaled by the work already queued on the endpoint.
pub fn peak_ewma_cost(rtt_ns: f64, pending: u32) -> f64 {
    rtt_ns * (f64::from(pending) + 1.0)
}

/// The live load of one endpoint, shared by every request and every config snapshot that
/// contains it.
#[derive(Debug)]
pub struct Load {
    pending: AtomicU32,
    observed: std::sync::atomic::AtomicBool,
    rtt_ns: AtomicU64,
    at_ns: AtomicU64,
    epoch: Instant,
}

impl Load {
    pub fn new(now: Instant) -> Load {
        Load {
            pending: AtomicU32::new(0),
            observed: std::sync::atomic::AtomicBool::new(false),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            at_ns: AtomicU64::new(0),
            epoch: now,
        }
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn estimate(&self) -> RttEstimate {
        let rtt_ns = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        RttEstimate {
            rtt_ns,
            at: self.epoch + Duration::from_nanos(self.at_ns.load(Ordering::Relaxed)),
            prior: !self.observed.load(Ordering::Relaxed),
        }
    }

    /// Records one response latency. Concurrent observers may overwrite each other; the estimate
    /// stays a valid recent value, which is all a balancer needs.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let next = self.estimate().observe(rtt, now, DECAY);
        self.observed.store(true, Ordering::Relaxed);
        self.rtt_ns.store(next.rtt_ns.to_bits(), Ordering::Relaxed);
        let at = next.at.saturating_duration_since(self.epoch).as_nanos();
        self.at_ns.store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn cost(&self, policy: Policy, now: Instant) -> f64 {
        match policy {
            Policy::LeastRequest => f64::from(self.pending()),
            _ => peak_ewma_cost(self.estimate().at(now, DECAY), self.pending()),
        }
    }

    /// Counts a request as pending until the guard drops.
    pub fn start(self: &std::sync::Arc<Self>) -> PendingGuard {
        self.pending.fetch_add(1, Ordering::Relaxed);
        PendingGuard(self.clone())
    }
}

/// Decrements the endpoint's pending count when dropped (the response finished or was abandoned).
#[derive(Debug)]
pub struct PendingGuard(std::sync::Arc<Load>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks an index into `n` endpoints. `cost(i)` is endpoint i's current cost, `rr` the cluster's
/// round-robin counter and `rand(k)` a uniform random number in `0..k`.
pub fn choose(
    policy: Policy,
    n: usize,
    mut cost: impl FnMut(usize) -> f64,
    rr: &AtomicUsize,
    mut rand: impl FnMut(usize) -> usize,
) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => Some(match policy {
            Policy::RoundRobin => rr.fetch_add(1, Ordering::Relaxed) % n,
            Policy::Random => rand(n),
            Policy::PeakEwma | Policy::LeastRequest => {
                let a = rand(n);
                // A second index distinct from the first, uniformly among the others.
                let b = (a + 1 + rand(n - 1)) % n;
                if cost(b) < cost(a) { b } else { a }
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn peak_is_taken_at_once_and_decays_with_time() {
        let t0 = Instant::now();
        let prior = RttEstimate { rtt_ns: 30e6, at: t0, prior: true };
        assert_eq!(prior.observe(ms(1), t0, DECAY).rtt_ns, 1e6, "the first sample replaces the prior");
        let e = RttEstimate { rtt_ns: 10e6, at: t0, prior: false };
        let slow = e.observe(ms(100), t0 + ms(1), DECAY);
        assert_eq!(slow.rtt_ns, 100e6, "a slower sample is the new peak");
        let fast = slow.observe(ms(10), t0 + ms(1) + DECAY, DECAY);
        let w = (-1.0f64).exp();
        assert!((fast.rtt_ns - (100e6 * w + 10e6 * (1.0 - w))).abs() < 1.0, "{fast:?}");
        // Reading decays toward zero, so an endpoint that was slow is tried again eventually.
        assert!(slow.at(t0 + ms(1) + DECAY * 5, DECAY) < 1e6);
        assert_eq!(slow.at(t0 + ms(1), DECAY), 100e6);
    }

    #[test]
    fn pending_requests_scale_the_cost() {
        assert_eq!(peak_ewma_cost(5.0, 0), 5.0);
        assert_eq!(peak_ewma_cost(5.0, 3), 20.0);
    }

    #[test]
    fn p2c_takes_the_cheaper_of_two_distinct_endpoints() {
        let rr = AtomicUsize::new(0);
        let costs = [5.0, 1.0, 9.0];
        // rand yields 0 for the first pick and 0 for the offset: candidates 0 and 1.
        let mut seq = [0, 0].into_iter();
        assert_eq!(choose(Policy::PeakEwma, 3, |i| costs[i], &rr, |_| seq.next().unwrap()), Some(1));
        // candidates 2 and 0 (offset 0 from 2 wraps to 0): 0 is cheaper.
        let mut seq = [2, 0].into_iter();
        assert_eq!(choose(Policy::PeakEwma, 3, |i| costs[i], &rr, |_| seq.next().unwrap()), Some(0));
        // Never the same endpoint twice.
        for a in 0..3 {
            for off in 0..2 {
                let mut seq = [a, off].into_iter();
                let mut seen = vec![];
                choose(
                    Policy::LeastRequest,
                    3,
                    |i| {
                        seen.push(i);
                        0.0
                    },
                    &rr,
                    |_| seq.next().unwrap(),
                );
                assert_ne!(seen[0], seen[1]);
            }
        }
    }

    #[test]
    fn round_robin_cycles_and_degenerate_sizes() {
        let rr = AtomicUsize::new(0);
        let picks: Vec<_> =
            (0..6).map(|_| choose(Policy::RoundRobin, 3, |_| 0.0, &rr, |_| 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(choose(Policy::PeakEwma, 0, |_| 0.0, &rr, |_| 0), None);
        assert_eq!(choose(Policy::PeakEwma, 1, |_| 0.0, &rr, |_| unreachable!()), Some(0));
    }

    #[test]
    fn p2c_spreads_load_away_from_a_slow_endpoint() {
        // Simulation with real randomness: endpoint 0 is 10x slower; it should get far less.
        let now = Instant::now();
        let loads: Vec<Arc<Load>> = (0..3).map(|_| Arc::new(Load::new(now))).collect();
        loads[0].observe(ms(100), now);
        loads[1].observe(ms(10), now);
        loads[2].observe(ms(10), now);
        let rr = AtomicUsize::new(0);
        let mut hits = [0u32; 3];
        for _ in 0..3000 {
            let i = choose(
                Policy::PeakEwma,
                3,
                |i| loads[i].cost(Policy::PeakEwma, now),
                &rr,
                |n| fastrand::usize(..n),
            )
            .unwrap();
            hits[i] += 1;
        }
        assert!(hits[0] < 300, "{hits:?}");
    }

    #[test]
    fn pending_guard_counts() {
        let load = Arc::new(Load::new(Instant::now()));
        let a = load.start();
        let b = load.start();
        assert_eq!(load.pending(), 2);
        drop(a);
        drop(b);
        assert_eq!(load.pending(), 0);
        assert_eq!(load.cost(Policy::LeastRequest, Instant::now()), 0.0);
    }
}
