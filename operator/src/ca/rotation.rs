//! Root rotation without a failed request. Started by annotating the CA Secret:
//!
//! ```sh
//! kubectl -n weft-system annotate --overwrite secret weft-ca weft.dev/root-rotation=requested
//! ```
//!
//! The leader then walks the phases, recorded in the Secret (its content first, then its
//! annotations), so any replica (or a restarted one) carries on where the last left off and a
//! request annotated again mid-rotation changes nothing:
//!
//! 1. `requested` -> `distributing`: a new root is made (`next-ca.crt`, `next-ca.key`) and added
//!    to `root-cert.pem`, so the trust bundle holds the old and the new root. Signing stays with
//!    the old one.
//! 2. `distributing` -> `switched`: once every injected namespace's bundle ConfigMap carries the
//!    new root, that moment is recorded (`weft.dev/root-rotation-bundled-at`); the propagation
//!    time (the kubelet's refresh of mounted ConfigMaps) after it, the new root signs. Proxies trust both, so old-root and new-root workloads
//!    keep talking.
//! 3. `switched` -> `done`, once the last certificate the old root signed has expired (the
//!    workload lifetime, plus the replicas' reload interval twice over for one that signed a
//!    little late): the old root leaves the bundle.
//!
//! Only a CA the operator made is rotated; a plug-in CA's request is refused. Where a rotation
//! stands ([`phase_of`]) and what to do next ([`plan`]) are pure functions.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_api::labels::INJECT_LABEL;
use weft_identity::ca::Issuer;

use super::{
    CaConfig,
    authority::{CERT, KEY, ROOTS},
    bundle::BUNDLE_KEY,
};
use crate::metrics::Metrics;

pub const PHASE: &str = "weft.dev/root-rotation";
pub const PHASE_SINCE: &str = "weft.dev/root-rotation-since";
pub const RETIRE_AT: &str = "weft.dev/root-rotation-retire-at";
pub const BUNDLED_AT: &str = "weft.dev/root-rotation-bundled-at";
pub const NEXT_CERT: &str = "next-ca.crt";
pub const NEXT_KEY: &str = "next-ca.key";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Kube { action: &'static str, source: kube::Error },
    #[error("making the new root: {0}")]
    Generate(#[from] weft_identity::ca::Error),
    #[error("Secret {0} has no {1} to switch to")]
    Missing(String, &'static str),
}

/// The next step of a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// No rotation under way.
    Idle,
    /// Make the new root and add it to the bundle.
    Distribute,
    /// Every bundle ConfigMap holds the new root: record when, so propagation counts from then.
    MarkBundled,
    /// Sign with the new root.
    Switch,
    /// Drop the old root from the bundle.
    Retire,
    /// Look again after this long.
    Wait(Duration),
}

/// Where a rotation stands, read from the Secret's content first (a `next-ca.crt` means the
/// new root is being distributed, a retire time means signing has switched), so that a request
/// annotated again in the middle of a rotation does not restart or wedge it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Requested,
    /// Distributing; `bundled_at` once every bundle ConfigMap held the new root.
    Distributing {
        bundled_at: Option<u64>,
    },
    Switched {
        retire_at: u64,
    },
}

/// The rotation's phase from the Secret (pure).
pub fn phase_of(secret: &Secret) -> Phase {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let number = |key: &str| annotations.get(key).and_then(|v| v.parse::<u64>().ok());
    if !text(secret, NEXT_CERT).is_empty() {
        return Phase::Distributing { bundled_at: number(BUNDLED_AT) };
    }
    if let Some(retire_at) = number(RETIRE_AT) {
        return Phase::Switched { retire_at };
    }
    match annotations.get(PHASE).map(String::as_str) {
        Some("requested") => Phase::Requested,
        _ => Phase::Idle,
    }
}

/// What a rotation in `phase` does at `now` (pure). `bundles_current`: every injected
/// namespace's ConfigMap carries the new root.
pub fn plan(phase: Phase, now: u64, propagation: Duration, bundles_current: bool) -> Step {
    let wait_until = |t: u64| Step::Wait(Duration::from_secs(t.saturating_sub(now).max(1)));
    match phase {
        Phase::Idle => Step::Idle,
        Phase::Requested => Step::Distribute,
        Phase::Distributing { bundled_at: None } if bundles_current => Step::MarkBundled,
        Phase::Distributing { bundled_at: None } => Step::Wait(Duration::from_secs(1)),
        Phase::Distributing { bundled_at: Some(t) } => {
            let ready_at = t + propagation.as_secs();
            if now < ready_at { wait_until(ready_at) } else { Step::Switch }
        }
        Phase::Switched { retire_at } if now < retire_at => wait_until(retire_at),
        Phase::Switched { .. } => Step::Retire,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn text(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

fn set(secret: &mut Secret, key: &str, value: &str) {
    secret
        .data
        .get_or_insert_with(BTreeMap::new)
        .insert(key.to_owned(), ByteString(value.as_bytes().to_vec()));
}

fn annotate(secret: &mut Secret, phase: &str, now: u64) {
    let annotations = secret.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(PHASE.to_owned(), phase.to_owned());
    annotations.insert(PHASE_SINCE.to_owned(), now.to_string());
}

/// Applies `step` to the Secret's content (pure but for the new root's key).
pub fn apply(secret: &mut Secret, step: Step, config: &CaConfig, now: u64) -> Result<(), Error> {
    match step {
        Step::Distribute => {
            let root = Issuer::new_root(
                &config.trust_domain,
                std::time::UNIX_EPOCH + Duration::from_secs(now),
                config.root_ttl,
            )?;
            let mut roots = text(secret, ROOTS);
            if roots.trim().is_empty() {
                roots = text(secret, CERT);
            }
            let bundle = format!("{}\n{}", roots.trim_end(), root.cert_pem());
            set(secret, NEXT_CERT, root.cert_pem());
            set(secret, NEXT_KEY, root.key_pem());
            set(secret, ROOTS, &bundle);
            annotate(secret, "distributing", now);
        }
        Step::MarkBundled => {
            secret
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(BUNDLED_AT.to_owned(), now.to_string());
        }
        Step::Switch => {
            let (cert, key) = (text(secret, NEXT_CERT), text(secret, NEXT_KEY));
            if cert.is_empty() || key.is_empty() {
                return Err(Error::Missing(config.secret.clone(), NEXT_CERT));
            }
            set(secret, CERT, &cert);
            set(secret, KEY, &key);
            if let Some(data) = secret.data.as_mut() {
                data.remove(NEXT_CERT);
                data.remove(NEXT_KEY);
            }
            // The old root signed nothing after this (the other replicas within two reloads).
            let retire_at = now + config.workload_ttl.as_secs() + 2 * config.reload_every.as_secs() + 1;
            annotate(secret, "switched", now);
            secret
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(RETIRE_AT.to_owned(), retire_at.to_string());
        }
        Step::Retire => {
            let cert = text(secret, CERT);
            set(secret, ROOTS, &cert);
            annotate(secret, "done", now);
            if let Some(a) = secret.metadata.annotations.as_mut() {
                a.remove(RETIRE_AT);
            }
        }
        Step::Idle | Step::Wait(_) => {}
    }
    Ok(())
}

/// A CA the user brought: anything the operator did not make (its Secret has no
/// `app.kubernetes.io/managed-by: weft-operator` label).
pub fn is_plug_in(secret: &Secret) -> bool {
    secret.metadata.labels.as_ref().and_then(|l| l.get(super::authority::MANAGED_BY)).map(String::as_str)
        != Some(super::authority::OPERATOR)
}

/// Whether every injected namespace's bundle ConfigMap holds `root_pem` (trivially true when
/// the operator keeps none).
async fn bundles_hold(client: &Client, config: &CaConfig, root_pem: &str) -> Result<bool, Error> {
    let Some(bundle) = &config.bundle else { return Ok(true) };
    let kube = |action| move |source| Error::Kube { action, source };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let list = namespaces
        .list(&ListParams::default().labels(&format!("{INJECT_LABEL}=enabled")))
        .await
        .map_err(kube("listing injected namespaces"))?;
    for ns in list.items.iter().filter_map(|n| n.metadata.name.as_deref()) {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let held = maps.get_opt(&bundle.name).await.map_err(kube("reading a trust bundle"))?;
        let has = held
            .and_then(|c| c.data)
            .and_then(|d| d.get(BUNDLE_KEY).cloned())
            .is_some_and(|b| b.contains(root_pem.trim()));
        if !has {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Drives rotations while this replica leads, until `stop`.
pub async fn run(
    client: Client,
    config: CaConfig,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    loop {
        let mut next = config.reload_every;
        if *leader.borrow_and_update() {
            match step_once(&client, &secrets, &config).await {
                Ok(Step::Wait(after)) => next = after.min(config.reload_every),
                Ok(_) => {}
                Err(error) => {
                    metrics.record_error("ca_rotation");
                    warn!(%error, "root rotation step failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
            r = leader.changed() => if r.is_err() { return },
        }
    }
}

async fn step_once(client: &Client, secrets: &Api<Secret>, config: &CaConfig) -> Result<Step, Error> {
    let kube = |action| move |source| Error::Kube { action, source };
    let Some(mut secret) = secrets.get_opt(&config.secret).await.map_err(kube("reading the CA Secret"))?
    else {
        return Ok(Step::Idle);
    };
    let phase = phase_of(&secret);
    let now = unix_now();
    if phase == Phase::Requested && is_plug_in(&secret) {
        // A root made here would replace the user's intermediate: their CA, their rotation.
        annotate(&mut secret, "refused", now);
        secrets
            .replace(&config.secret, &PostParams::default(), &secret)
            .await
            .map_err(kube("writing the CA Secret"))?;
        warn!(secret = %config.secret, "root rotation refused: the Secret holds a plug-in CA; rotate it by replacing its material (docs/security.md)");
        return Ok(Step::Idle);
    }
    let bundles_current = match phase {
        Phase::Distributing { bundled_at: None } => {
            bundles_hold(client, config, &text(&secret, NEXT_CERT)).await?
        }
        _ => true,
    };
    let step = plan(phase, now, config.rotation_propagation, bundles_current);
    if matches!(step, Step::Distribute | Step::MarkBundled | Step::Switch | Step::Retire) {
        apply(&mut secret, step, config, now)?;
        // Replace with the read resourceVersion: a concurrent writer makes this fail and retry.
        secrets
            .replace(&config.secret, &PostParams::default(), &secret)
            .await
            .map_err(kube("writing the CA Secret"))?;
        info!(?step, secret = %config.secret, "root rotation advanced");
    }
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_secs(120);

    #[test]
    fn the_phases_advance_in_order_and_wait_for_their_conditions() {
        let distributing = |bundled_at| Phase::Distributing { bundled_at };
        assert_eq!(plan(Phase::Idle, 1_000, P, true), Step::Idle);
        assert_eq!(plan(Phase::Requested, 1_000, P, true), Step::Distribute);
        assert_eq!(plan(distributing(None), 1_030, P, false), Step::Wait(Duration::from_secs(1)));
        assert_eq!(plan(distributing(None), 1_030, P, true), Step::MarkBundled);
        // Propagation counts from when the ConfigMaps held the root, not from distribution.
        assert_eq!(plan(distributing(Some(1_030)), 1_060, P, true), Step::Wait(Duration::from_secs(90)));
        assert_eq!(plan(distributing(Some(1_030)), 1_150, P, true), Step::Switch);
        assert_eq!(
            plan(Phase::Switched { retire_at: 2_000 }, 1_500, P, true),
            Step::Wait(Duration::from_secs(500))
        );
        assert_eq!(plan(Phase::Switched { retire_at: 2_000 }, 2_000, P, true), Step::Retire);
    }

    #[test]
    fn a_request_annotated_again_mid_rotation_does_not_restart_it() {
        let config = CaConfig::new("mesh", "cluster.local");
        let mut secret =
            super::super::authority::new_root_secret(&config, std::time::SystemTime::now()).unwrap();
        secret.metadata.annotations = Some(BTreeMap::from([(PHASE.to_owned(), "requested".to_owned())]));
        assert_eq!(phase_of(&secret), Phase::Requested);
        apply(&mut secret, Step::Distribute, &config, 1_000).unwrap();
        apply(&mut secret, Step::MarkBundled, &config, 1_010).unwrap();
        let again = |secret: &mut Secret| {
            secret.metadata.annotations.as_mut().unwrap().insert(PHASE.to_owned(), "requested".to_owned());
        };
        again(&mut secret);
        assert_eq!(phase_of(&secret), Phase::Distributing { bundled_at: Some(1_010) });
        apply(&mut secret, Step::Switch, &config, 2_000).unwrap();
        again(&mut secret);
        assert!(matches!(phase_of(&secret), Phase::Switched { .. }));
        assert!(!is_plug_in(&secret), "the operator's own root, mid-rotation");
    }

    #[test]
    fn a_rotation_keeps_both_roots_until_the_old_ones_leaves_expire() {
        let config = CaConfig::new("mesh", "cluster.local");
        let mut secret =
            super::super::authority::new_root_secret(&config, std::time::SystemTime::now()).unwrap();
        let old = text(&secret, CERT);
        apply(&mut secret, Step::Distribute, &config, 1_000).unwrap();
        let new = text(&secret, NEXT_CERT);
        assert_ne!(old, new);
        assert_eq!(text(&secret, CERT), old, "the old root still signs");
        assert!(text(&secret, ROOTS).contains(old.trim()) && text(&secret, ROOTS).contains(new.trim()));
        let signer =
            super::super::authority::signer_from("weft-ca", secret.data.as_ref().unwrap(), "1").unwrap();
        assert_eq!(signer.bundle.roots.len(), 2);

        apply(&mut secret, Step::Switch, &config, 2_000).unwrap();
        assert_eq!(text(&secret, CERT), new, "the new root signs");
        assert!(text(&secret, ROOTS).contains(old.trim()), "the old root is still trusted");
        let retire_at = secret.metadata.annotations.as_ref().unwrap()[RETIRE_AT].parse::<u64>().unwrap();
        assert_eq!(retire_at, 2_000 + 86_400 + 10 + 1);

        apply(&mut secret, Step::Retire, &config, retire_at).unwrap();
        assert_eq!(text(&secret, ROOTS), new, "only the new root is left");
        assert_eq!(secret.metadata.annotations.as_ref().unwrap()[PHASE], "done");
        let signer =
            super::super::authority::signer_from("weft-ca", secret.data.as_ref().unwrap(), "2").unwrap();
        assert_eq!(signer.bundle.roots.len(), 1);
    }
}
