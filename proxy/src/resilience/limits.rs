//! Connection-pool limits (DestinationRule `connectionPool`): how many requests, retries and
//! HTTP/1.1 connections a destination may have at once. Over a limit a request is answered at
//! once (503, flag `UO`) instead of queueing without bound; only requests waiting for an HTTP/1.1
//! connection queue, up to `max_pending`.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use tokio::sync::Notify;

/// A destination's limits; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolLimits {
    /// HTTP/1.1 connections carrying a request at once (an HTTP/2 endpoint uses one connection).
    pub max_connections: u32,
    /// Requests waiting for one of those connections.
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_requests_per_connection: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

/// A counter with a ceiling; `try_take` hands out guards that give the unit back on drop.
#[derive(Debug, Default)]
pub struct Gauge {
    in_use: AtomicU32,
    freed: Notify,
}

/// One unit of a `Gauge`, returned on drop.
#[derive(Debug)]
pub struct Taken(Arc<Gauge>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

impl Gauge {
    /// A unit if fewer than `max` are in use (`max` 0: always).
    pub fn try_take(self: &Arc<Self>, max: u32) -> Option<Taken> {
        let took = self
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1));
        took.ok().map(|_| Taken(self.clone()))
    }

    /// Waits until a unit is free and takes it.
    pub async fn take(self: &Arc<Self>, max: u32) -> Taken {
        loop {
            let freed = self.freed.notified();
            if let Some(t) = self.try_take(max) {
                return t;
            }
            freed.await;
        }
    }

    pub fn in_use(&self) -> u32 {
        self.in_use.load(Ordering::Acquire)
    }
}

/// The live counts behind a destination's limits.
#[derive(Debug, Default)]
pub struct PoolCounts {
    pub requests: Arc<Gauge>,
    pub pending: Arc<Gauge>,
    pub connections: Arc<Gauge>,
    pub retries: Arc<Gauge>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_up_to_the_ceiling_and_waiters_get_freed_units() {
        let g = Arc::new(Gauge::default());
        let a = g.try_take(2).expect("first");
        let _b = g.try_take(2).expect("second");
        assert!(g.try_take(2).is_none(), "full");
        assert!(g.try_take(0).is_some(), "0 means unlimited");
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.take(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        let _c = waiter.await.expect("a freed unit goes to the waiter");
        assert_eq!(g.in_use(), 2);
    }
}
