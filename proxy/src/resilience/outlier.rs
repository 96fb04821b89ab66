//! Outlier detection (passive health checking): an endpoint that fails several requests in a row
//! is ejected from balancing for `base_ejection_time × times ejected`.
//!
//! Ejection is per endpoint (one pod address), kept on the `Endpoint`, so every subset and route
//! that contains the pod sees it: a pod that fails does so for every caller, and the state
//! survives config pushes as endpoints do. Only clusters with a policy skip ejected endpoints;
//! each applies its own `max_ejection_percent` when ejecting and `min_health_percent` when
//! picking. The decisions are pure functions below; `Health` holds the counts.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// A cluster's policy (DestinationRule `outlierDetection`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 0: off.
    pub consecutive_5xx: u32,
    /// 0: off.
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
    /// A healthy endpoint has one ejection forgiven per interval.
    pub interval: Duration,
}

/// An ejection never lasts longer than this (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What one request to an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// No response: connect failure, reset or timeout (each counts as a gateway error).
    LocalFailure,
}

impl Outcome {
    fn is_5xx(self) -> bool {
        match self {
            Outcome::Status(s) => s >= 500,
            Outcome::LocalFailure => true,
        }
    }

    fn is_gateway_error(self) -> bool {
        matches!(self, Outcome::Status(502..=504) | Outcome::LocalFailure)
    }
}

/// How long the `times`-th ejection lasts.
pub fn ejection_time(base: Duration, times: u32) -> Duration {
    base.saturating_mul(times.max(1)).min(MAX_EJECTION.max(base))
}

/// Whether one more endpoint may be ejected: at most `max_percent` of them are out at once, but
/// at least one may be (as in Envoy).
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    let cap = (total * max_percent as usize / 100).max(1);
    ejected < cap && ejected < total
}

/// Whether a pick should skip ejected endpoints: only while enough of them are in; below
/// `min_health_percent` (or with none in) ejections are ignored and all endpoints balanced.
pub fn honour_ejections(healthy: usize, total: usize, min_health_percent: u32) -> bool {
    healthy > 0 && healthy * 100 >= total * min_health_percent as usize
}

#[derive(Debug, Default)]
struct Counts {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    times_ejected: u32,
    returned_at: Option<Instant>,
}

/// One endpoint's failure counts and ejection.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    /// Nanoseconds after `epoch` until which the endpoint is out; 0: in. Read on every pick of a
    /// cluster with a policy, so it is an atomic.
    ejected_until: AtomicU64,
    counts: Mutex<Counts>,
}

impl Health {
    pub fn new(now: Instant) -> Health {
        Health { epoch: now, ejected_until: AtomicU64::new(0), counts: Mutex::default() }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.nanos(now) < until
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// Records an outcome; true when it crossed a threshold of `policy` (the caller then asks
    /// `eject`, which checks the cluster's share).
    pub fn observe(&self, policy: &OutlierPolicy, outcome: Outcome) -> bool {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.consecutive_5xx = if outcome.is_5xx() { c.consecutive_5xx + 1 } else { 0 };
        c.consecutive_gateway = if outcome.is_gateway_error() { c.consecutive_gateway + 1 } else { 0 };
        let over = |n: u32, limit: u32| limit > 0 && n >= limit;
        over(c.consecutive_5xx, policy.consecutive_5xx)
            || over(c.consecutive_gateway, policy.consecutive_gateway)
    }

    /// Ejects the endpoint (unless it is out already) and says for how long.
    pub fn eject(&self, policy: &OutlierPolicy, now: Instant) -> Option<Duration> {
        if self.is_ejected(now) {
            return None;
        }
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        // One ejection is forgiven per interval spent healthy since the last return.
        if let Some(back) = c.returned_at {
            let healthy = now.saturating_duration_since(back).as_nanos();
            let intervals = healthy / policy.interval.as_nanos().max(1);
            c.times_ejected = c.times_ejected.saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
        }
        c.times_ejected += 1;
        c.consecutive_5xx = 0;
        c.consecutive_gateway = 0;
        let time = ejection_time(policy.base_ejection, c.times_ejected);
        c.returned_at = Some(now + time);
        self.ejected_until.store(self.nanos(now + time), Ordering::Relaxed);
        Some(time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            interval: Duration::from_secs(10),
        }
    }

    #[test]
    fn consecutive_failures_trip_and_a_success_resets() {
        let h = Health::new(Instant::now());
        let p = policy();
        assert!(!h.observe(&p, Outcome::Status(500)));
        assert!(!h.observe(&p, Outcome::LocalFailure));
        assert!(!h.observe(&p, Outcome::Status(200)), "a success resets the count");
        assert!(!h.observe(&p, Outcome::Status(503)));
        assert!(!h.observe(&p, Outcome::Status(503)));
        assert!(h.observe(&p, Outcome::Status(503)));
        let gw = OutlierPolicy { consecutive_5xx: 0, consecutive_gateway: 2, ..p };
        let h = Health::new(Instant::now());
        assert!(!h.observe(&gw, Outcome::Status(500)));
        assert!(!h.observe(&gw, Outcome::Status(500)), "500 is not a gateway error");
        assert!(!h.observe(&gw, Outcome::Status(502)));
        assert!(h.observe(&gw, Outcome::Status(504)));
    }

    #[test]
    fn ejection_share_and_minimum_health() {
        assert!(may_eject(0, 3, 10), "at least one, whatever the percent");
        assert!(!may_eject(1, 3, 10));
        assert!(may_eject(1, 10, 20) && !may_eject(2, 10, 20));
        assert!(!may_eject(1, 1, 100), "never more than all");
        assert!(honour_ejections(1, 2, 50));
        assert!(!honour_ejections(1, 3, 50), "below min health: ignore ejections");
        assert!(!honour_ejections(0, 3, 0), "none left: balance over all");
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_for_base_times_count_then_back_and_forgiven_over_time() {
        let h = Health::new(Instant::now());
        let p = policy();
        assert_eq!(h.eject(&p, Instant::now()), Some(Duration::from_secs(30)));
        assert!(h.is_ejected(Instant::now()));
        assert_eq!(h.eject(&p, Instant::now()), None, "already out");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!h.is_ejected(Instant::now()), "back after its time");
        assert_eq!(h.eject(&p, Instant::now()), Some(Duration::from_secs(60)), "second time: twice as long");
        tokio::time::advance(Duration::from_secs(60 + 15)).await;
        assert_eq!(
            h.eject(&p, Instant::now()),
            Some(Duration::from_secs(60)),
            "one interval healthy forgives one ejection: the third counts as the second"
        );
        assert_eq!(ejection_time(Duration::from_secs(30), 100), MAX_EJECTION);
    }
}
