//! Root rotation without a failed request. Started by annotating the CA Secret:
//!
//! ```sh
//! kubectl -n weft-system annotate secret weft-ca weft.dev/root-rotation=requested
//! ```
//!
//! The leader then walks the phases, recorded in the Secret's annotations so any replica (or a
//! restarted one) carries on where the last left off:
//!
//! 1. `requested` -> `distributing`: a new root is made (`next-ca.crt`, `next-ca.key`) and added
//!    to `root-cert.pem`, so the trust bundle holds the old and the new root. Signing stays with
//!    the old one.
//! 2. `distributing` -> `switched`, once every injected namespace's bundle ConfigMap carries the
//!    new root and the propagation time (the kubelet's refresh of mounted ConfigMaps) has passed:
//!    the new root signs from now on. Proxies trust both, so old-root and new-root workloads
//!    keep talking.
//! 3. `switched` -> `done`, once the last certificate the old root signed has expired (the
//!    workload lifetime, plus the replicas' reload interval twice over for one that signed a
//!    little late): the old root leaves the bundle.
//!
//! What to do next is a pure function of the annotations and the time ([`plan`]).

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
    /// Sign with the new root.
    Switch,
    /// Drop the old root from the bundle.
    Retire,
    /// Look again after this long.
    Wait(Duration),
}

/// What a rotation in `phase` (begun `since`, Unix seconds) does at `now` (pure).
/// `bundles_current`: every injected namespace's ConfigMap carries the new root.
pub fn plan(
    phase: Option<&str>,
    since: u64,
    retire_at: Option<u64>,
    now: u64,
    propagation: Duration,
    bundles_current: bool,
) -> Step {
    let wait_until = |t: u64| Step::Wait(Duration::from_secs(t.saturating_sub(now).max(1)));
    match phase {
        Some("requested") => Step::Distribute,
        Some("distributing") => {
            let ready_at = since + propagation.as_secs();
            if now < ready_at {
                wait_until(ready_at)
            } else if !bundles_current {
                Step::Wait(Duration::from_secs(1))
            } else {
                Step::Switch
            }
        }
        Some("switched") => match retire_at {
            Some(t) if now < t => wait_until(t),
            _ => Step::Retire,
        },
        _ => Step::Idle,
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

/// A CA the user brought: intermediates, or roots other than the signing certificate.
pub fn is_plug_in(secret: &Secret) -> bool {
    let roots = text(secret, ROOTS);
    !text(secret, super::authority::CHAIN).trim().is_empty()
        || (!roots.trim().is_empty()
            && roots.trim() != text(secret, CERT).trim()
            && !secret_is_rotating(secret))
}

fn secret_is_rotating(secret: &Secret) -> bool {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PHASE))
        .is_some_and(|p| p != "requested" && p != "done" && p != "refused")
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
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let number = |key: &str| annotations.get(key).and_then(|v| v.parse::<u64>().ok());
    let phase = annotations.get(PHASE).map(String::as_str);
    let now = unix_now();
    let bundles_current = match phase {
        Some("distributing") => bundles_hold(client, config, &text(&secret, NEXT_CERT)).await?,
        _ => true,
    };
    if phase == Some("requested") && is_plug_in(&secret) {
        // A root made here would replace the user's intermediate: their CA, their rotation.
        annotate(&mut secret, "refused", now);
        secrets
            .replace(&config.secret, &PostParams::default(), &secret)
            .await
            .map_err(kube("writing the CA Secret"))?;
        warn!(secret = %config.secret, "root rotation refused: the Secret holds a plug-in CA; rotate it by replacing its material (docs/security.md)");
        return Ok(Step::Idle);
    }
    let since = number(PHASE_SINCE).unwrap_or(0);
    let step = plan(phase, since, number(RETIRE_AT), now, config.rotation_propagation, bundles_current);
    if matches!(step, Step::Distribute | Step::Switch | Step::Retire) {
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
        assert_eq!(plan(None, 0, None, 1_000, P, true), Step::Idle);
        assert_eq!(plan(Some("done"), 0, None, 1_000, P, true), Step::Idle);
        assert_eq!(plan(Some("requested"), 0, None, 1_000, P, true), Step::Distribute);
        assert_eq!(
            plan(Some("distributing"), 1_000, None, 1_030, P, true),
            Step::Wait(Duration::from_secs(90))
        );
        assert_eq!(
            plan(Some("distributing"), 1_000, None, 1_120, P, false),
            Step::Wait(Duration::from_secs(1))
        );
        assert_eq!(plan(Some("distributing"), 1_000, None, 1_120, P, true), Step::Switch);
        assert_eq!(
            plan(Some("switched"), 1_120, Some(2_000), 1_500, P, true),
            Step::Wait(Duration::from_secs(500))
        );
        assert_eq!(plan(Some("switched"), 1_120, Some(2_000), 2_000, P, true), Step::Retire);
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
