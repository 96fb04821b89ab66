//! The state and pure decisions behind the resilience policies: retry budgets, connection-pool
//! limits and outlier ejection. The HTTP layers that use them live in `http::{fault, retry,
//! mirror, forward}`.
//!
//! A destination's state (`ClusterState`) outlives config pushes: the compiler hands the state of
//! a cluster with the same name to its successor, so a push never refills a budget or forgets
//! requests in flight. Ejections live on endpoints, which are reused the same way.

pub mod budget;
pub mod limits;
pub mod outlier;

/// What one destination (`service|subset|port`) counts across requests and config pushes.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub budget: budget::Budget,
    pub pool: limits::PoolCounts,
}
