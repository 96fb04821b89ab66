//! Leader election with a `coordination.k8s.io/v1` Lease: kube-runtime has no elector, so this is
//! a small one. [`decide`] is the pure timing logic; [`Elector::run`] gets the Lease, acquires or
//! renews it with resourceVersion-checked updates (a lost race is a 409, never two leaders), and
//! releases it on shutdown so a standby takes over at once instead of after the lease expires.
//! Every replica serves config; only the leader writes status.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Lease {name}: {source}")]
    Get { name: String, source: Box<kube::Error> },
    #[error("writing Lease {name}: {source}")]
    Write { name: String, source: Box<kube::Error> },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Get { .. } => "lease_get",
            Error::Write { .. } => "lease_write",
        }
    }
}

/// What to do with the Lease as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Free, expired, or never held: take it.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it until `until`.
    Follow { holder: String, until: Timestamp },
}

/// The pure timing rule. A Lease is free when it has no holder, or when its holder has not
/// renewed it within its `leaseDurationSeconds`.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else { return Decision::Acquire };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1));
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return Decision::Acquire;
    };
    let until =
        renewed.0.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(duration)).unwrap_or(renewed.0);
    if now >= until { Decision::Acquire } else { Decision::Follow { holder: holder.to_owned(), until } }
}

/// A leader stops acting as one when it has not renewed for this long, before others may take
/// the lease (which they do after the full duration).
pub fn renew_deadline(lease_duration: Duration) -> Duration {
    lease_duration * 2 / 3
}

#[derive(Clone, Debug)]
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub retry_period: Duration,
}

impl Elector {
    /// Runs until `stop`, keeping `leader` up to date; releases the Lease when stopping as leader.
    pub async fn run(
        self,
        leader: watch::Sender<bool>,
        metrics: std::sync::Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let mut last_renew: Option<tokio::time::Instant> = None;
        loop {
            let leading = match self.try_once(Timestamp::now()).await {
                Ok(held) => {
                    if held {
                        last_renew = Some(tokio::time::Instant::now());
                    }
                    held
                }
                Err(error) => {
                    metrics.record_error(error.metric_label());
                    warn!(%error, "leader election");
                    // Keep leading only while the last renewal is recent enough.
                    last_renew.is_some_and(|t| t.elapsed() < renew_deadline(self.lease_duration))
                }
            };
            if !leading {
                last_renew = None;
            }
            if *leader.borrow() != leading {
                info!(identity = %self.identity, lease = %self.name, leading, "leadership changed");
                metrics.set_leader(leading);
                leader.send_replace(leading);
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.retry_period) => {}
            }
        }
        if *leader.borrow() {
            leader.send_replace(false);
            metrics.set_leader(false);
            match self.release().await {
                Ok(()) => info!(lease = %self.name, "lease released"),
                Err(error) => warn!(%error, "releasing the lease"),
            }
        }
    }

    /// One round: returns whether this replica holds the Lease afterwards.
    pub async fn try_once(&self, now: Timestamp) -> Result<bool, Error> {
        let existing = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| Error::Get { name: self.name.clone(), source: Box::new(source) })?;
        let duration = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return self.write(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        match decide(Some(spec), &self.identity, now) {
            Decision::Follow { .. } => Ok(false),
            Decision::Renew => {
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(duration);
                // resourceVersion from the read makes this a compare-and-swap.
                self.write(self.api.replace(&self.name, &PostParams::default(), &lease).await)
            }
            Decision::Acquire => {
                let changed_hands = spec.holder_identity.as_deref() != Some(self.identity.as_str());
                spec.holder_identity = Some(self.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(duration);
                if changed_hands {
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                self.write(self.api.replace(&self.name, &PostParams::default(), &lease).await)
            }
        }
    }

    fn write(&self, result: Result<Lease, kube::Error>) -> Result<bool, Error> {
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote first (409 on create or on a stale resourceVersion).
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(source) => Err(Error::Write { name: self.name.clone(), source: Box::new(source) }),
        }
    }

    /// Gives the Lease up if still ours.
    pub async fn release(&self) -> Result<(), Error> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| Error::Get { name: self.name.clone(), source: Box::new(source) })?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.write(self.api.replace(&self.name, &PostParams::default(), &lease).await).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + secs).unwrap()
    }

    fn spec(holder: Option<&str>, renewed: Option<i64>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(15),
            renew_time: renewed.map(|s| MicroTime(t(s))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn free_expired_or_unheld_leases_are_acquired() {
        assert_eq!(decide(None, "a", t(0)), Decision::Acquire);
        assert_eq!(decide(Some(&spec(None, Some(0))), "a", t(0)), Decision::Acquire);
        assert_eq!(decide(Some(&spec(Some(""), Some(0))), "a", t(0)), Decision::Acquire);
        assert_eq!(decide(Some(&spec(Some("b"), None)), "a", t(0)), Decision::Acquire);
        assert_eq!(decide(Some(&spec(Some("b"), Some(0))), "a", t(15)), Decision::Acquire);
    }

    #[test]
    fn a_held_lease_is_renewed_by_its_holder_and_followed_by_others() {
        assert_eq!(decide(Some(&spec(Some("a"), Some(0))), "a", t(100)), Decision::Renew);
        assert_eq!(
            decide(Some(&spec(Some("b"), Some(0))), "a", t(14)),
            Decision::Follow { holder: "b".into(), until: t(15) }
        );
    }

    #[test]
    fn leaders_step_down_before_the_lease_can_be_taken() {
        assert_eq!(renew_deadline(Duration::from_secs(15)), Duration::from_secs(10));
    }
}
