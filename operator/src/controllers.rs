//! The edge between the apiserver and the index: one kube-runtime watcher per kind turns watch
//! events into [`Change`]s, and one task owns the [`Index`], applies changes, and after a short
//! debounce resolves and publishes a [`Snapshot`] on a `tokio::sync::watch`. Nothing is
//! published until every kind has listed once, so a restarted operator never serves a partial
//! view: proxies keep the config they have until then.

use std::{fmt::Debug, hash::Hasher, sync::Arc, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _, future::BoxFuture};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, Resource, ResourceExt as _};
use kube_runtime::{WatchStreamExt as _, watcher};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, debug, info, info_span, warn};
use weft_api::{AuthorizationPolicy, DestinationRule, PeerAuthentication, VirtualService};

use crate::{
    index::{Change, Index, Key, Kind, Object, Resolution},
    metrics::Metrics,
};

/// One published resolution.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases with every publication.
    pub generation: u64,
    pub resolution: Resolution,
    /// `cluster.local`.
    pub cluster_domain: String,
    /// When the oldest change this snapshot carries arrived (push latency is measured from it).
    pub changed_at: Instant,
}

/// Debounce: publish once no change has arrived for `quiet`, and at the latest `max_delay`
/// after the first unpublished change.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce { quiet: Duration::from_millis(50), max_delay: Duration::from_millis(250) }
    }
}

/// What the watchers send the index task.
#[derive(Debug)]
pub enum Message {
    Change(Change),
    /// The kind has listed everything once.
    Synced(Kind),
}

/// A stable content hash (SipHash with fixed keys: the same bytes give the same number in every
/// process, so a restarted operator computes the versions proxies already hold).
pub fn content_hash(message: &impl prost::Message) -> u64 {
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    hasher.write(&message.encode_to_vec());
    hasher.finish()
}

/// Owns the index until `rx` closes: applies changes, debounces, resolves, publishes.
pub async fn run_index(
    mut index: Index,
    mut rx: mpsc::Receiver<Message>,
    publish: watch::Sender<Option<Arc<Snapshot>>>,
    debounce: Debounce,
    metrics: Arc<Metrics>,
) {
    let mut synced: Vec<Kind> = Vec::new();
    let mut generation = 0;
    let mut dirty_since: Option<Instant> = None;
    let mut closed = false;
    while !closed {
        let Some(first) = rx.recv().await else { break };
        let started = Instant::now();
        let mut take = |msg: Message, index: &mut Index, dirty_since: &mut Option<Instant>| {
            let changed = match msg {
                Message::Change(change) => index.change(change),
                Message::Synced(kind) => {
                    if !synced.contains(&kind) {
                        synced.push(kind);
                        debug!(kind = kind.as_str(), "synced");
                    }
                    true
                }
            };
            if changed && dirty_since.is_none() {
                *dirty_since = Some(Instant::now());
            }
        };
        take(first, &mut index, &mut dirty_since);
        // Gather what follows closely.
        loop {
            let deadline = (Instant::now() + debounce.quiet).min(started + debounce.max_delay);
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(msg)) => take(msg, &mut index, &mut dirty_since),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let all_synced = Kind::ALL.iter().all(|k| synced.contains(k));
        let Some(changed_at) = dirty_since.filter(|_| all_synced) else { continue };
        dirty_since = None;
        let timer = std::time::Instant::now();
        let resolution = index.resolve();
        metrics.record_resolve(timer.elapsed().as_secs_f64());
        generation += 1;
        debug!(
            generation,
            services = resolution.services.len(),
            elapsed_us = timer.elapsed().as_micros() as u64,
            "resolved"
        );
        if generation == 1 {
            info!(counts = ?index.counts(), "every kind listed; serving config");
        }
        let snapshot = Snapshot {
            generation,
            resolution,
            cluster_domain: index.settings().cluster_domain.clone(),
            changed_at,
        };
        publish.send_replace(Some(Arc::new(snapshot)));
    }
}

/// What the watchers share.
#[derive(Clone)]
pub struct WatchScope {
    pub client: Client,
    /// `None`: the whole cluster (production); `Some`: one namespace (tests, single-tenant use).
    pub namespace: Option<String>,
    pub tx: mpsc::Sender<Message>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for WatchScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchScope").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl WatchScope {
    fn watch<K>(&self, kind: Kind, wrap: fn(K) -> Object) -> (Kind, BoxFuture<'static, ()>)
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        let api = match &self.namespace {
            Some(ns) => Api::<K>::namespaced(self.client.clone(), ns),
            None => Api::<K>::all(self.client.clone()),
        };
        (kind, Box::pin(watch_kind(api, kind, wrap, self.tx.clone(), self.metrics.clone())))
    }
}

/// Starts one watcher per kind, all feeding `scope.tx`, each running until `stop`.
pub fn spawn_watchers(scope: WatchScope, tasks: &TaskTracker, stop: CancellationToken) {
    let watchers: Vec<(Kind, BoxFuture<'static, ()>)> = vec![
        scope.watch::<VirtualService>(Kind::VirtualService, |o| Object::VirtualService(Box::new(o))),
        scope.watch::<DestinationRule>(Kind::DestinationRule, |o| Object::DestinationRule(Box::new(o))),
        scope.watch::<PeerAuthentication>(Kind::PeerAuthentication, |o| {
            Object::PeerAuthentication(Box::new(o))
        }),
        scope.watch::<AuthorizationPolicy>(Kind::AuthorizationPolicy, |o| {
            Object::AuthorizationPolicy(Box::new(o))
        }),
        scope.watch::<Service>(Kind::Service, |o| Object::Service(Box::new(o))),
        scope.watch::<EndpointSlice>(Kind::EndpointSlice, |o| Object::EndpointSlice(Box::new(o))),
        scope.watch::<Pod>(Kind::Pod, |o| Object::Pod(Box::new(o))),
    ];
    drop(scope);
    for (kind, task) in watchers {
        let stop = stop.clone();
        let span = info_span!("watch", kind = kind.as_str());
        tasks.spawn(
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = task => {}
                }
            }
            .instrument(span),
        );
    }
}

/// Watches one kind (relisting with backoff after errors) and forwards its events.
async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    wrap: fn(K) -> Object,
    tx: mpsc::Sender<Message>,
    metrics: Arc<Metrics>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut listing: Vec<Object> = Vec::new();
    loop {
        let event = match stream.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(error) => {
                metrics.record_error("watch");
                warn!(%error, "watch failed; retrying with backoff");
                continue;
            }
        };
        let message = match event {
            watcher::Event::Init => {
                listing.clear();
                continue;
            }
            watcher::Event::InitApply(obj) => {
                listing.push(wrap(strip(obj)));
                continue;
            }
            watcher::Event::InitDone => {
                let objects = std::mem::take(&mut listing);
                debug!(count = objects.len(), "listed");
                if tx.send(Message::Change(Change::Reset(kind, objects))).await.is_err() {
                    break;
                }
                Message::Synced(kind)
            }
            watcher::Event::Apply(obj) => Message::Change(Change::Apply(wrap(strip(obj)))),
            watcher::Event::Delete(obj) => Message::Change(Change::Delete(
                kind,
                Key::new(obj.namespace().unwrap_or_default(), obj.name_any()),
            )),
        };
        if tx.send(message).await.is_err() {
            break;
        }
    }
}

/// Managed fields are large and never read.
fn strip<K: Resource>(mut obj: K) -> K {
    obj.meta_mut().managed_fields = None;
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(rx: &mut watch::Receiver<Option<Arc<Snapshot>>>) -> Arc<Snapshot> {
        rx.changed().await.expect("publisher alive");
        rx.borrow_and_update().clone().expect("published")
    }

    fn svc(name: &str) -> Message {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }))
        .unwrap();
        Message::Change(Change::Apply(Object::Service(Box::new(svc))))
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_only_once_every_kind_listed_then_debounces_bursts() {
        let (tx, rx) = mpsc::channel(64);
        let (publish, mut published) = watch::channel(None);
        let debounce = Debounce { quiet: Duration::from_millis(50), max_delay: Duration::from_millis(200) };
        tokio::spawn(run_index(Index::default(), rx, publish, debounce, Arc::new(Metrics::default())));

        tx.send(svc("a")).await.unwrap();
        for kind in &Kind::ALL[..6] {
            tx.send(Message::Synced(*kind)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(published.borrow().is_none(), "not every kind listed yet");
        tx.send(Message::Synced(Kind::Pod)).await.unwrap();
        let first = next(&mut published).await;
        assert_eq!(first.generation, 1);
        assert_eq!(first.resolution.services.len(), 1);

        // A burst within the quiet period is one publication.
        let start = Instant::now();
        for name in ["b", "c", "d"] {
            tx.send(svc(name)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let second = next(&mut published).await;
        assert_eq!(second.generation, 2);
        assert_eq!(second.resolution.services.len(), 4);
        assert_eq!(start.elapsed(), Duration::from_millis(60 + 50 - 20));

        // A steady trickle is published at the max delay.
        let start = Instant::now();
        let trickle = tokio::spawn({
            let tx = tx.clone();
            async move {
                for i in 0..20 {
                    tx.send(svc(&format!("t{i}"))).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
        });
        let third = next(&mut published).await;
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        assert!(third.resolution.services.len() < 24);
        trickle.await.unwrap();

        // A no-op change publishes nothing.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = published.borrow().as_ref().unwrap().generation;
        tx.send(svc("a")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(published.borrow().as_ref().unwrap().generation, before);
    }

    #[test]
    fn content_hashes_are_stable() {
        let a = weft_proto::v1::Service { name: "a".into(), ..Default::default() };
        assert_eq!(content_hash(&a), content_hash(&a.clone()));
        assert_ne!(content_hash(&a), content_hash(&weft_proto::v1::Service::default()));
        // Pinned: the same bytes hash the same in every build and process.
        assert_eq!(content_hash(&a), 4_247_799_881_607_347_686);
    }
}
