//! Status conditions: [`desired`] decides (purely) whether an object's status must change; the
//! writer, running only while this replica leads, applies the change with server-side apply on
//! the status subresource under the one field manager `weft-operator`.

use std::{collections::BTreeMap, fmt::Debug, sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use weft_api::{
    AuthorizationPolicy, Condition as K8sCondition, ConditionType, DestinationRule, PeerAuthentication,
    Status, VirtualService, labels::FIELD_MANAGER,
};

use crate::{
    controllers::Snapshot,
    index::{Condition, DesiredStatus, Key, Kind},
    metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("patching the status of {kind} {key}: {source}")]
    Patch { kind: &'static str, key: Key, source: Box<kube::Error> },
    #[error("{kind} has no status subresource")]
    NoStatus { kind: &'static str },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Patch { .. } => "status_patch",
            Error::NoStatus { .. } => "status_kind",
        }
    }
}

/// Failed or not-yet-visible writes are retried this often even without new snapshots.
const RESYNC: Duration = Duration::from_secs(10);

/// The status `d` asks for, or `None` when the object already carries it. A condition keeps its
/// `lastTransitionTime` while its status (True/False) stays the same.
pub fn desired(d: &DesiredStatus, now: Timestamp) -> Option<Status> {
    let current = d.current.clone().unwrap_or_default();
    let condition = |type_: ConditionType, c: &Condition| {
        let status = if c.ok { "True" } else { "False" };
        let previous = current.conditions.iter().find(|p| p.type_ == type_.as_str());
        let since = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Time(now),
        };
        K8sCondition {
            type_: type_.as_str().to_owned(),
            status: status.to_owned(),
            reason: c.reason.to_owned(),
            message: c.message.clone(),
            observed_generation: d.generation,
            last_transition_time: since,
        }
    };
    let wanted = Status {
        observed_generation: d.generation,
        conditions: vec![
            condition(ConditionType::Accepted, &d.accepted),
            condition(ConditionType::ResolvedRefs, &d.resolved_refs),
        ],
    };
    // Only the two conditions this operator owns are compared (SSA leaves others alone).
    let mut have = current.clone();
    let ours = [ConditionType::Accepted.as_str(), ConditionType::ResolvedRefs.as_str()];
    have.conditions.retain(|c| ours.contains(&c.type_.as_str()));
    have.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    (have != wanted).then_some(wanted)
}

/// Writes statuses while `leader` is true, on every snapshot and every [`RESYNC`].
pub async fn run_writer(
    client: Client,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    // What was last written per object, so a write is not repeated while the watch catches up.
    let mut written: BTreeMap<(Kind, Key), Status> = BTreeMap::new();
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = snapshots.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            _ = resync.tick() => written.clear(),
        }
        if !*leader.borrow_and_update() {
            written.clear();
            continue;
        }
        let Some(snapshot) = snapshots.borrow_and_update().clone() else { continue };
        let now = Timestamp::now();
        for ((kind, key), d) in &snapshot.resolution.statuses {
            let Some(status) = desired(d, now) else {
                written.remove(&(*kind, key.clone()));
                continue;
            };
            let fingerprint = without_times(&status);
            if written.get(&(*kind, key.clone())) == Some(&fingerprint) {
                continue;
            }
            match patch(&client, *kind, key, &status).await {
                Ok(()) => {
                    metrics.record_status_write(kind.as_str());
                    debug!(kind = kind.as_str(), ns = %key.namespace, name = %key.name, generation = ?d.generation,
                        accepted = d.accepted.ok, resolved_refs = d.resolved_refs.ok, "status written");
                    written.insert((*kind, key.clone()), fingerprint);
                }
                Err(error) => {
                    metrics.record_error(error.metric_label());
                    warn!(%error, "status write failed; retrying on the next change or resync");
                }
            }
        }
    }
}

fn without_times(status: &Status) -> Status {
    let mut s = status.clone();
    for c in &mut s.conditions {
        c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
    }
    s
}

async fn patch(client: &Client, kind: Kind, key: &Key, status: &Status) -> Result<(), Error> {
    match kind {
        Kind::VirtualService => patch_one::<VirtualService>(client, kind, key, status).await,
        Kind::DestinationRule => patch_one::<DestinationRule>(client, kind, key, status).await,
        Kind::PeerAuthentication => patch_one::<PeerAuthentication>(client, kind, key, status).await,
        Kind::AuthorizationPolicy => patch_one::<AuthorizationPolicy>(client, kind, key, status).await,
        Kind::Service | Kind::EndpointSlice | Kind::Pod => Err(Error::NoStatus { kind: kind.as_str() }),
    }
}

async fn patch_one<K>(client: &Client, kind: Kind, key: &Key, status: &Status) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &key.namespace);
    let body = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    match api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing to write.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Patch { kind: kind.as_str(), key: key.clone(), source: Box::new(source) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(ok: bool, message: &str) -> Condition {
        Condition { ok, reason: if ok { "Accepted" } else { "Conflict" }, message: message.into() }
    }

    fn d(generation: i64, accepted: Condition, current: Option<Status>) -> DesiredStatus {
        DesiredStatus {
            generation: Some(generation),
            accepted,
            resolved_refs: Condition { ok: true, reason: "ResolvedRefs", message: "ok".into() },
            current,
        }
    }

    #[test]
    fn writes_both_conditions_with_the_observed_generation() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let s =
            desired(&d(3, cond(false, "host x is already routed by VirtualService a/b"), None), t0).unwrap();
        assert_eq!(s.observed_generation, Some(3));
        let types: Vec<_> = s.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str())).collect();
        assert_eq!(types, [("Accepted", "False"), ("ResolvedRefs", "True")]);
        assert!(
            s.conditions.iter().all(|c| c.observed_generation == Some(3) && c.last_transition_time.0 == t0)
        );
        assert_eq!(s.conditions[0].reason, "Conflict");
        assert_eq!(s.conditions[0].message, "host x is already routed by VirtualService a/b");
    }

    #[test]
    fn unchanged_status_is_not_rewritten_and_transition_times_survive_message_changes() {
        let t0 = Timestamp::from_second(1000).unwrap();
        let t1 = Timestamp::from_second(2000).unwrap();
        let written = desired(&d(1, cond(true, "accepted"), None), t0).unwrap();
        assert_eq!(desired(&d(1, cond(true, "accepted"), Some(written.clone())), t1), None);

        // A new generation with the same verdict: rewritten, transition time kept.
        let next = desired(&d(2, cond(true, "accepted"), Some(written.clone())), t1).unwrap();
        assert_eq!(next.conditions[0].last_transition_time.0, t0);
        assert_eq!(next.observed_generation, Some(2));

        // The verdict flips: the time moves.
        let flipped = desired(&d(2, cond(false, "conflict"), Some(next)), t1).unwrap();
        assert_eq!(flipped.conditions[0].last_transition_time.0, t1);
        assert_eq!(flipped.conditions[1].last_transition_time.0, t0);

        // Conditions of other writers do not make ours look stale.
        let mut shared = flipped.clone();
        shared.conditions.insert(0, K8sCondition { type_: "Ready".into(), ..flipped.conditions[0].clone() });
        assert_eq!(desired(&d(2, cond(false, "conflict"), Some(shared)), t1), None);
    }
}
