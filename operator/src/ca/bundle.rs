//! The trust bundle where proxies read it: ConfigMap `weft-trust-bundle` (key `ca.crt`) in every
//! namespace labelled `weft.dev/inject=enabled`, which the injector mounts into each proxy.
//!
//! The leader reconciles: on a CA change, a labelled namespace appearing, leadership gained, and
//! every minute. [`reconcile`] compares and writes one namespace's ConfigMap and returns when to
//! look again; a failure is logged, counted and retried sooner.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams},
};
use kube_runtime::{WatchStreamExt as _, watcher};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_api::labels::{FIELD_MANAGER, INJECT_LABEL};

use super::Authority;
use crate::metrics::Metrics;

/// The key proxies read.
pub const BUNDLE_KEY: &str = "ca.crt";
const RESYNC: Duration = Duration::from_secs(60);
const RETRY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct BundleConfig {
    /// The ConfigMap's name in each namespace (`weft-trust-bundle`).
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{action} in namespace {namespace}: {source}")]
pub struct Error {
    action: &'static str,
    namespace: String,
    source: kube::Error,
}

/// What to do after a reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Written or already right: look again after this long (or at the next change).
    Requeue(Duration),
}

/// The ConfigMap a namespace should have (pure).
pub fn desired(config: &BundleConfig, namespace: &str, bundle_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "weft-operator".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(BUNDLE_KEY.to_owned(), bundle_pem.to_owned())])),
        ..ConfigMap::default()
    }
}

/// Whether `existing` already carries `bundle_pem` (pure).
pub fn up_to_date(existing: Option<&ConfigMap>, bundle_pem: &str) -> bool {
    existing.and_then(|c| c.data.as_ref()).and_then(|d| d.get(BUNDLE_KEY)).is_some_and(|b| b == bundle_pem)
}

/// Makes one namespace's ConfigMap carry `bundle_pem`.
pub async fn reconcile(
    client: &Client,
    config: &BundleConfig,
    namespace: &str,
    bundle_pem: &str,
) -> Result<Action, Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let err = |action| {
        let namespace = namespace.to_owned();
        move |source| Error { action, namespace, source }
    };
    let existing = api.get_opt(&config.name).await.map_err(err("reading the trust bundle"))?;
    if !up_to_date(existing.as_ref(), bundle_pem) {
        let patch = Patch::Apply(desired(config, namespace, bundle_pem));
        api.patch(&config.name, &PatchParams::apply(FIELD_MANAGER).force(), &patch)
            .await
            .map_err(err("writing the trust bundle"))?;
        info!(%namespace, configmap = %config.name, "trust bundle written");
    }
    Ok(Action::Requeue(RESYNC))
}

/// Runs the reconciler until `stop`; writes only while `leader` is true.
pub async fn run(
    client: Client,
    config: BundleConfig,
    authority: Arc<Authority>,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let selector = format!("{INJECT_LABEL}=enabled");
    // A labelled namespace appearing (or relabelled) wakes the loop.
    let appeared = Arc::new(Notify::new());
    let watch_config = watcher::Config::default().labels(&selector);
    let wake = appeared.clone();
    let watch_stop = stop.clone();
    let watch_api = namespaces.clone();
    tokio::spawn(async move {
        let mut events = watcher(watch_api, watch_config).default_backoff().boxed();
        loop {
            tokio::select! {
                _ = watch_stop.cancelled() => return,
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Apply(_) | watcher::Event::InitDone)) => wake.notify_one(),
                    Some(_) => {}
                    None => return,
                },
            }
        }
    });
    let mut changes = authority.changes();
    loop {
        // Marked seen before reading the CA, so a change while writing wakes the next pass.
        changes.borrow_and_update();
        let mut next = RESYNC;
        if *leader.borrow_and_update()
            && let Some(signer) = authority.current()
        {
            match namespaces.list(&ListParams::default().labels(&selector)).await {
                Ok(list) => {
                    for ns in list.items.iter().filter_map(|n| n.metadata.name.as_deref()) {
                        match reconcile(&client, &config, ns, &signer.bundle_pem).await {
                            Ok(Action::Requeue(after)) => next = next.min(after),
                            Err(error) => {
                                metrics.record_error("trust_bundle");
                                warn!(%error, "trust bundle not written; retrying");
                                next = RETRY;
                            }
                        }
                    }
                }
                Err(error) => {
                    metrics.record_error("trust_bundle");
                    warn!(%error, "listing injected namespaces failed; retrying");
                    next = RETRY;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
            _ = appeared.notified() => {}
            r = changes.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configmap_is_up_to_date_only_with_the_same_bundle() {
        let config = BundleConfig { name: "weft-trust-bundle".into() };
        let current = desired(&config, "shop", "ROOT-A\n");
        assert_eq!(current.metadata.namespace.as_deref(), Some("shop"));
        assert!(up_to_date(Some(&current), "ROOT-A\n"));
        assert!(!up_to_date(Some(&current), "ROOT-A\nROOT-B\n"));
        assert!(!up_to_date(None, "ROOT-A\n"));
    }
}
