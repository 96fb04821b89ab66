//! Retries: tries again while the outcome matches the route's `retryOn`, attempts remain, the
//! route's deadline has not passed, the body can be replayed, the destination's budget has a
//! retry left and its `max_retries` allows one more in flight. Waits an exponential backoff with
//! full jitter between tries, and prefers an endpoint this request has not tried yet.

use std::net::SocketAddr;

use tokio::time::Instant;

use super::{
    Body,
    error::Failure,
    forward::{Answer, Destination, Failed, Head, Try, forward},
    replay::{Replay, ReplayBody},
};
use crate::{
    config::{
        Cluster,
        policy::{RetryPolicy, TryOutcome, backoff},
    },
    metrics::{ClusterLabels, Metrics},
    upstream::{ConnectOpts, Proto},
};

/// How a sequence of tries ended.
#[derive(Debug)]
pub struct Finished {
    pub result: Result<Answer, Failed>,
    /// Retries sent.
    pub retries: u32,
    /// The last outcome was still worth retrying, but no retry was allowed (Envoy's `URX`).
    pub exhausted: bool,
}

/// Everything but the body and the policy.
#[derive(Debug)]
pub struct Tries<'a> {
    pub cluster: &'a std::sync::Arc<Cluster>,
    pub proto: Proto,
    pub opts: &'a ConnectOpts,
    pub key: Option<u64>,
    /// The route's deadline, over all tries.
    pub deadline: Option<Instant>,
    pub metrics: &'a Metrics,
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sends `head` with `first` until `policy` says stop; retries read replays from `body`, the
/// handle `ReplayBody::new` returned with `first`.
pub async fn run(
    head: &Head,
    body: &Replay,
    first: ReplayBody,
    policy: &RetryPolicy,
    t: Tries<'_>,
) -> Finished {
    let cluster = t.cluster;
    let count = |result: &'static str| {
        t.metrics.retries.get_or_create(&ClusterLabels { cluster: cluster.name.clone(), result }).inc();
    };
    cluster.state.budget.record_request(&cluster.budget, Instant::now());
    let mut next = Some(first);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0;
    // Held while a retry is in flight (the destination's `max_retries`).
    let mut _retry_unit = None;
    loop {
        let deadline = earliest(t.deadline, policy.per_try_timeout.map(|p| Instant::now() + p));
        let Some(this_body) = next.take() else {
            // Not reached: a fresh body is free, and a retry is sent only with a replay.
            let failed =
                Failed { failure: Failure::UpstreamReset, outcome: TryOutcome::NoAnswer, endpoint: None };
            return Finished { result: Err(failed), retries, exhausted: true };
        };
        let result = forward(
            head.request(Body::new(this_body)),
            Try {
                destination: Destination::Cluster(cluster),
                proto: t.proto,
                opts: t.opts,
                key: t.key,
                tried: &tried,
                deadline,
                metrics: t.metrics,
            },
        )
        .await;
        let (outcome, endpoint) = match &result {
            Ok(a) => (a.outcome, Some(a.endpoint.addr)),
            Err(f) => (f.outcome, f.endpoint.as_ref().map(|e| e.addr)),
        };
        if !policy.on.matches(outcome) {
            return Finished { result, retries, exhausted: false };
        }
        let now = Instant::now();
        let wait = backoff(policy.backoff, retries + 1, fastrand::u32(..));
        // Why no retry follows: `Some(None)` when the policy's own bounds say so, `Some(reason)`
        // when a safeguard did (counted).
        let refusal = if retries >= policy.attempts || t.deadline.is_some_and(|d| now + wait >= d) {
            Some(None)
        } else if let Some(replay) = body.try_replay() {
            next = Some(replay);
            if !cluster.state.budget.try_retry(&cluster.budget, now) {
                Some(Some("budget_exhausted"))
            } else {
                match cluster.state.pool.retries.try_take(cluster.limits.max_retries) {
                    Some(unit) => {
                        _retry_unit = Some(unit);
                        None
                    }
                    None => Some(Some("overflow")),
                }
            }
        } else {
            Some(Some("not_replayable"))
        };
        if let Some(reason) = refusal {
            if let Some(reason) = reason {
                count(reason);
            }
            return Finished { result, retries, exhausted: true };
        }
        drop(result);
        tried.extend(endpoint);
        retries += 1;
        count("sent");
        tokio::time::sleep(wait).await;
    }
}
