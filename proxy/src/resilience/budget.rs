//! Retry budgets: retries to one destination may add at most `percent` of the requests it got
//! over a sliding window, plus a floor of `min_per_second`, so that retries can absorb scattered
//! failures but never multiply an outage (Linkerd's retry budget; Istio's `retryBudget` budgets
//! concurrency instead, see docs/traffic.md).
//!
//! The window is ten buckets; a bucket is reused once it falls out of the window. The arithmetic
//! is in pure functions of the counts; `Budget` only adds a short lock and the clock.

use std::{sync::Mutex, time::Duration};

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

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which slice of time (since `Window::epoch`, in bucket lengths) the counts belong to.
    slice: u64,
    requests: u64,
    retries: u64,
}

#[derive(Debug)]
struct Window {
    epoch: Instant,
    bucket_len: Duration,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    fn new(now: Instant, window: Duration) -> Window {
        Window {
            epoch: now,
            bucket_len: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn slice(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(elapsed / self.bucket_len.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The bucket for `now`, emptied first when it last counted an older slice.
    fn current(&mut self, now: Instant) -> &mut Bucket {
        let slice = self.slice(now);
        let bucket = &mut self.buckets[(slice % BUCKETS as u64) as usize];
        if bucket.slice != slice {
            *bucket = Bucket { slice, ..Bucket::default() };
        }
        bucket
    }

    /// Requests and retries counted in the window that ends at `now`.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let slice = self.slice(now);
        self.buckets
            .iter()
            .filter(|b| slice.saturating_sub(b.slice) < BUCKETS as u64 && b.slice <= slice)
            .fold((0, 0), |(req, ret), b| (req + b.requests, ret + b.retries))
    }
}

/// One destination's budget; kept across config pushes (see `ClusterState`).
#[derive(Debug)]
pub struct Budget {
    window: Mutex<Option<Window>>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { window: Mutex::new(None) }
    }
}

impl Budget {
    fn with_window<T>(&self, policy: &BudgetPolicy, now: Instant, f: impl FnOnce(&mut Window) -> T) -> T {
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let fresh =
            |w: &Window| w.bucket_len == (policy.window / BUCKETS as u32).max(Duration::from_millis(1));
        // A new window length starts counting afresh.
        let window = match guard.as_mut() {
            Some(w) if fresh(w) => w,
            _ => guard.insert(Window::new(now, policy.window)),
        };
        f(window)
    }

    /// Counts a first attempt (retries are counted by `try_retry`).
    pub fn record_request(&self, policy: &BudgetPolicy, now: Instant) {
        self.with_window(policy, now, |w| w.current(now).requests += 1);
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn try_retry(&self, policy: &BudgetPolicy, now: Instant) -> bool {
        self.with_window(policy, now, |w| {
            let (requests, retries) = w.totals(now);
            let allowed = policy.allows(requests, retries);
            if allowed {
                w.current(now).retries += 1;
            }
            allowed
        })
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
