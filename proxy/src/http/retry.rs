//! Retries: tries again while the outcome matches the route's `retryOn`, attempts remain, the
//! route's deadline has not passed, the body can be replayed, the destination's budget has a
//! retry left and its `max_retries` allows one more in flight. Waits an exponential backoff with
//! full jitter between tries, and prefers an endpoint this request has not tried yet.

use std::net::SocketAddr;

use tokio::time::Instant;

use http::Request;

use super::{
    Body,
    forward::{Answer, Destination, Failed, Head, Try, forward},
    replay::Replay,
};
use crate::{
    config::{
        Cluster,
        policy::{RetryPolicy, backoff},
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
    pub grpc: bool,
    pub metrics: &'a Metrics,
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What later tries are made of.
#[derive(Debug)]
pub enum Again {
    /// A copy of the head and a replay of the body for every try (boxed: most requests go
    /// without).
    Copies(Box<Copies>),
    /// Only a request that never left (a connect failure hands it back) is tried again: enough
    /// for conditions that mean "not sent", and it costs no copy at all.
    Unsent,
}

/// The head, and the handle `Replay::new` returned with the first try's body.
#[derive(Debug)]
pub struct Copies {
    pub head: Head,
    pub body: Replay,
}

impl Again {
    /// Whether `policy` can retry something other than a request that never left on `proto`
    /// (then tries need copies).
    pub fn needs_copies(policy: &RetryPolicy, proto: Proto) -> bool {
        let on = &policy.on;
        on.server_error
            || on.gateway_error
            || on.reset
            || on.retriable_4xx
            || !on.statuses.is_empty()
            || !on.grpc.is_empty()
            // Only HTTP/2 refuses streams.
            || (on.refused_stream && proto == Proto::Http2)
    }
}

/// Sends `first` until `policy` says stop; later tries are made as `again` says.
pub async fn run(first: Request<Body>, again: &Again, policy: &RetryPolicy, t: Tries<'_>) -> Finished {
    let cluster = t.cluster;
    let count = |result: &'static str| {
        t.metrics.retries.get_or_create(&ClusterLabels { cluster: cluster.name.clone(), result }).inc();
    };
    cluster.state.budget.record_request(&cluster.budget, Instant::now());
    let mut next = first;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0;
    // Held while a retry is in flight (the destination's `max_retries`).
    let mut _retry_unit = None;
    loop {
        let deadline = earliest(t.deadline, policy.per_try_timeout.map(|p| Instant::now() + p));
        let try_ = Try {
            destination: Destination::Cluster(cluster),
            proto: t.proto,
            opts: t.opts,
            key: t.key,
            tried: &tried,
            deadline,
            grpc: t.grpc,
            metrics: t.metrics,
        };
        let mut result = forward(next, try_).await;
        let (outcome, endpoint) = match &result {
            Ok(a) => (a.outcome, Some(a.endpoint.addr)),
            Err(f) => (f.outcome, f.endpoint.as_ref().map(|e| e.addr)),
        };
        if !policy.on.matches(outcome) {
            return Finished { result, retries, exhausted: false };
        }
        let now = Instant::now();
        let wait = backoff(policy.backoff, retries + 1, fastrand::u32(..));
        if retries >= policy.attempts || t.deadline.is_some_and(|d| now + wait >= d) {
            return Finished { result, retries, exhausted: true };
        }
        let unsent = result.as_mut().err().and_then(|f| f.unsent.take());
        let request = match (unsent, again) {
            (Some(request), _) => request,
            (None, Again::Copies(copies)) => match copies.body.try_replay() {
                Some(replay) => copies.head.request(Body::new(replay)),
                None => {
                    count("not_replayable");
                    return Finished { result, retries, exhausted: true };
                }
            },
            (None, Again::Unsent) => return Finished { result, retries, exhausted: true },
        };
        if !cluster.state.budget.try_retry(&cluster.budget, now) {
            count("budget_exhausted");
            return Finished { result, retries, exhausted: true };
        }
        match cluster.state.pool.retries.try_take(cluster.limits.max_retries) {
            Some(unit) => _retry_unit = Some(unit),
            None => {
                count("overflow");
                return Finished { result, retries, exhausted: true };
            }
        }
        drop(result);
        next = request;
        tried.extend(endpoint);
        retries += 1;
        count("sent");
        tokio::time::sleep(wait).await;
    }
}
