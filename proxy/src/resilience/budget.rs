//! Retry budgets: retries to one destination may add at most `percent` of the requests it got
//! over a sliding window, plus a floor of `min_per_second`, so that retries can absorb scattered
//! failures but never multiply an outage (Linkerd's retry budget; Istio's `retryBudget` budgets
//! concurrency instead, see docs/traffic.md).
//!
//! The window is ten buckets; a bucket is reused once it falls out of the window. The arithmetic
//! is a pure function of the counts (`BudgetPolicy::allows`); `Budget` only adds atomic counters
//! and the clock.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// A budget's parameters (DestinationRule `trafficPolicy.retryBudget`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetPolicy {
    /// Retries may add this share (0 to 100) of the requests in the window.
    pub percent: f64,
    /// ...and always this many per second of window.
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        BudgetPolicy { percent: 20.0, min_per_second: 3, window: Duration::from_secs(10) }
    }
}

impl BudgetPolicy {
    /// Whether one more retry fits, given the requests and retries already in the window.
    pub fn allows(&self, requests: u64, retries: u64) -> bool {
        let floor = f64::from(self.min_per_second) * self.window.as_secs_f64();
        (retries as f64) < floor + self.percent / 100.0 * requests as f64
    }
}

const BUCKETS: usize = 10;

/// One tenth of the window: the counts of one slice of time.
#[derive(Debug, Default)]
struct Bucket {
    /// Which slice (time since `Budget::epoch`, in bucket lengths) the counts belong to.
    slice: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// One destination's budget; kept across config pushes (see `ClusterState`). Lock-free: every
/// request counts itself here, so a lock would be taken on every request. Under contention a
/// count may land in a bucket just being recycled and be lost; a budget needs no more precision.
#[derive(Debug)]
pub struct Budget {
    epoch: Instant,
    buckets: [Bucket; BUCKETS],
}

impl Default for Budget {
    fn default() -> Self {
        Budget { epoch: Instant::now(), buckets: Default::default() }
    }
}

impl Budget {
    fn slice(&self, policy: &BudgetPolicy, now: Instant) -> u64 {
        let len = (policy.window / BUCKETS as u32).max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(elapsed / len.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The bucket for `slice`, emptied first when it last counted an older slice.
    fn current(&self, slice: u64) -> &Bucket {
        let bucket = &self.buckets[(slice % BUCKETS as u64) as usize];
        let seen = bucket.slice.load(Ordering::Acquire);
        if seen != slice
            && bucket.slice.compare_exchange(seen, slice, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            bucket.requests.store(0, Ordering::Release);
            bucket.retries.store(0, Ordering::Release);
        }
        bucket
    }

    /// Counts a first attempt (retries are counted by `try_retry`).
    pub fn record_request(&self, policy: &BudgetPolicy, now: Instant) {
        self.current(self.slice(policy, now)).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn try_retry(&self, policy: &BudgetPolicy, now: Instant) -> bool {
        let slice = self.slice(policy, now);
        let (requests, retries) = self
            .buckets
            .iter()
            .filter(|b| {
                let s = b.slice.load(Ordering::Acquire);
                s <= slice && slice - s < BUCKETS as u64
            })
            .fold((0, 0), |(req, ret), b| {
                (req + b.requests.load(Ordering::Relaxed), ret + b.retries.load(Ordering::Relaxed))
            });
        let allowed = policy.allows(requests, retries);
        if allowed {
            self.current(slice).retries.fetch_add(1, Ordering::Relaxed);
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_share_of_requests_plus_the_floor() {
        let p = BudgetPolicy { percent: 20.0, min_per_second: 0, window: Duration::from_secs(10) };
        assert!(p.allows(100, 19));
        assert!(!p.allows(100, 20));
        let p = BudgetPolicy { min_per_second: 3, ..p };
        assert!(p.allows(0, 29), "3 per second over 10 s");
        assert!(!p.allows(0, 30));
        assert!(p.allows(100, 49) && !p.allows(100, 50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_total_outage_gets_the_share_and_the_floor_no_more() {
        let policy = BudgetPolicy { percent: 20.0, min_per_second: 3, window: Duration::from_secs(10) };
        let budget = Budget::default();
        let mut retries = 0;
        // 100 requests per second for 30 s, every one wanting a retry.
        for _ in 0..30 {
            for _ in 0..100 {
                budget.record_request(&policy, Instant::now());
                retries += u32::from(budget.try_retry(&policy, Instant::now()));
                tokio::time::advance(Duration::from_millis(10)).await;
            }
        }
        // 20% of 3,000 requests plus 3 per second.
        assert!(retries <= 600 + 90, "{retries} retries");
        assert!(retries >= 550, "the budget refills as the window slides: {retries}");
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_leave_the_window() {
        let policy = BudgetPolicy { percent: 50.0, min_per_second: 0, window: Duration::from_secs(1) };
        let budget = Budget::default();
        for _ in 0..10 {
            budget.record_request(&policy, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!budget.try_retry(&policy, Instant::now()), "the requests are out of the window");
        budget.record_request(&policy, Instant::now());
        budget.record_request(&policy, Instant::now());
        assert!(budget.try_retry(&policy, Instant::now()));
        assert!(!budget.try_retry(&policy, Instant::now()), "50% of 2");
    }
}
