//! Wiring: watchers -> index task -> snapshots -> (config server, status writer); the CA
//! (Secret -> signer -> certificates, the 15012 TLS, bundle ConfigMaps); the elector decides who
//! writes status and bundles; admin serves health and metrics. [`start`] returns once the
//! listeners are bound; [`Handle::ready`] waits for the first snapshot.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info};

use crate::{
    admin,
    ca::{self, Authority, CaConfig, serving::ServingTls},
    controllers::{self, Debounce, Snapshot},
    index::{Index, Settings},
    lease::Elector,
    metrics::Metrics,
    server::ConfigServer,
    status,
    webhook_cert::{self, WebhookCertConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The gRPC server (config and CA, TLS): `0.0.0.0:15012`.
    pub grpc_addr: SocketAddr,
    /// `/live`, `/ready`, `/metrics`: `0.0.0.0:15014`.
    pub admin_addr: SocketAddr,
    pub index: Settings,
    /// Watch one namespace only (`None`: the whole cluster). Status is written only for what is
    /// watched.
    pub watch_namespace: Option<String>,
    pub debounce: Debounce,
    /// `None`: this replica always leads (one replica, tests).
    pub lease: Option<LeaseConfig>,
    /// The injector's serving certificate and caBundle (`None`: not managed here).
    pub webhook_cert: Option<WebhookCertConfig>,
    /// The mesh CA (always on: the gRPC port serves TLS with its certificate).
    pub ca: CaConfig,
}

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    pub duration: Duration,
    pub retry_period: Duration,
}

impl Config {
    /// Loopback, ephemeral ports, no lease; the CA Secret in `namespace`, no bundle ConfigMaps.
    pub fn for_tests(namespace: &str) -> Config {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            index: Settings::default(),
            watch_namespace: None,
            debounce: Debounce::default(),
            lease: None,
            webhook_cert: None,
            ca: CaConfig::new(namespace, "cluster.local"),
        }
    }
}

/// A running operator.
#[derive(Debug)]
pub struct Handle {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// The mesh CA's current signer and trust bundle.
    pub authority: Arc<Authority>,
    serving: Arc<ServingTls>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    leader: watch::Receiver<bool>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Handle {
    /// Resolves once every kind has listed, the first snapshot is served, the CA is loaded
    /// and the gRPC port serves its certificate.
    pub async fn ready(&self) {
        let mut rx = self.snapshots.clone();
        let _ = rx.wait_for(Option::is_some).await;
        self.authority.ready().await;
        self.serving.ready().await;
    }

    pub fn snapshots(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshots.clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    pub fn leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Stops everything: streams close, the lease is released, tasks end.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pub async fn start(client: Client, config: Config) -> Result<Handle, Error> {
    let bind = |what: &'static str, addr: SocketAddr| async move {
        let l = TcpListener::bind(addr).await.map_err(|source| Error::Bind { what, addr, source })?;
        let local = l.local_addr().map_err(|source| Error::Bind { what, addr, source })?;
        Ok::<_, Error>((l, local))
    };
    let (grpc, grpc_addr) = bind("gRPC", config.grpc_addr).await?;
    let (admin_listener, admin_addr) = bind("admin", config.admin_addr).await?;

    let metrics = Arc::new(Metrics::default());
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (publish, snapshots) = watch::channel(None);
    let (changes_tx, changes_rx) = mpsc::channel(1024);

    let scope = controllers::WatchScope {
        client: client.clone(),
        namespace: config.watch_namespace.clone(),
        tx: changes_tx,
        metrics: metrics.clone(),
    };
    controllers::spawn_watchers(scope, &tasks, stop.clone());
    tasks.spawn(controllers::run_index(
        Index::new(config.index.clone()),
        changes_rx,
        publish,
        config.debounce,
        metrics.clone(),
    ));

    let (leader_tx, leader) = watch::channel(false);
    match config.lease.clone() {
        Some(l) => {
            let elector = Elector {
                api: Api::<Lease>::namespaced(client.clone(), &l.namespace),
                name: l.name,
                identity: l.identity,
                lease_duration: l.duration,
                retry_period: l.retry_period,
            };
            tasks.spawn(elector.run(leader_tx, metrics.clone(), stop.clone()));
        }
        None => {
            metrics.set_leader(true);
            leader_tx.send_replace(true);
            // Keep the sender alive until stop, so the writer does not see a closed channel.
            let stop = stop.clone();
            tasks.spawn(async move {
                stop.cancelled().await;
                drop(leader_tx);
            });
        }
    }
    if let Some(cert) = config.webhook_cert.clone() {
        let domain = config.index.cluster_domain.clone();
        tasks.spawn(webhook_cert::run(client.clone(), cert, domain, leader.clone(), stop.clone()));
    }
    tasks.spawn(status::run_writer(
        client.clone(),
        snapshots.clone(),
        leader.clone(),
        metrics.clone(),
        stop.clone(),
    ));

    let authority = Arc::new(Authority::default());
    tasks.spawn(ca::authority::run(
        client.clone(),
        config.ca.clone(),
        authority.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    if let Some(bundle) = config.ca.bundle.clone() {
        tasks.spawn(ca::bundle::run(
            client.clone(),
            bundle,
            authority.clone(),
            leader.clone(),
            metrics.clone(),
            stop.clone(),
        ));
    }
    tasks.spawn(ca::rotation::run(
        client.clone(),
        config.ca.clone(),
        leader.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let serving = Arc::new(ServingTls::default());
    tasks.spawn(ca::serving::keep_certificate(
        config.ca.clone(),
        config.index.cluster_domain.clone(),
        authority.clone(),
        serving.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let certify = ca::certify::CertifyService {
        client: client.clone(),
        config: config.ca.clone(),
        authority: authority.clone(),
        metrics: metrics.clone(),
    };
    let server = ConfigServer::new(
        snapshots.clone(),
        metrics.clone(),
        config.ca.namespace.clone(),
        config.ca.trust_domain.clone(),
        stop.clone(),
    );
    let incoming = ca::serving::incoming(grpc, serving.clone(), metrics.clone(), stop.clone());
    tasks.spawn(async move {
        if let Err(error) = server.serve(incoming, Some(certify)).await {
            error!(%error, "gRPC server stopped");
        }
    });
    let router = admin::router(snapshots.clone(), serving.clone(), metrics.clone());
    let admin_stop = stop.clone();
    tasks.spawn(async move {
        if let Err(error) = admin::serve(admin_listener, router, admin_stop).await {
            error!(%error, "admin server stopped");
        }
    });
    info!(grpc = %grpc_addr, admin = %admin_addr, "weft-operator started");
    Ok(Handle { grpc_addr, admin_addr, metrics, authority, serving, snapshots, leader, stop, tasks })
}
