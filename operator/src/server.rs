//! The `ConfigDiscovery` gRPC service (tonic, port 15012, TLS from the mesh CA, beside the CA's
//! `Certificates` service). A stream is authorized by the caller's certificate: `Subscribe` only
//! for a node in the certificate's namespace (so a proxy never sees another namespace's inbound
//! policy), `Watch` (every service) only for identities of the mesh namespace. Each `Subscribe`
//! stream holds what its proxy asked for; [`view`] (pure) computes the
//! proxy's config from a snapshot and that set, and the stream sends it whenever its content
//! version changes: first a full snapshot, then pushes as snapshots are published (the index
//! already debounces). Streams only move data.

use std::{collections::BTreeSet, net::SocketAddr, pin::Pin, sync::Arc};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, info_span};
use weft_proto::v1::{
    self as pb,
    config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer},
};

use crate::{
    ca::{
        certify::CertifyService,
        serving::{Connection, PeerInfo},
    },
    controllers::{Snapshot, content_hash},
    index::{self, Resolution},
    metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("serving gRPC: {0}")]
    Serve(tonic::transport::Error),
}

/// How long a new stream may take to send its first request.
const FIRST_MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Subscriptions per stream are bounded: a proxy talks to at most this many destinations.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

#[derive(Clone, Debug)]
pub struct ConfigServer {
    snapshots: Snapshots,
    metrics: Arc<Metrics>,
    /// The mesh namespace: its identities may `Watch` everything.
    mesh_namespace: String,
    /// Certificates of another trust domain (a plug-in root shared by meshes) are refused.
    trust_domain: String,
    stop: CancellationToken,
}

impl ConfigServer {
    pub fn new(
        snapshots: Snapshots,
        metrics: Arc<Metrics>,
        mesh_namespace: String,
        trust_domain: String,
        stop: CancellationToken,
    ) -> Self {
        ConfigServer { snapshots, metrics, mesh_namespace, trust_domain, stop }
    }

    /// Serves the config and CA services on `incoming` (TLS connections) until `stop`.
    pub async fn serve(
        self,
        incoming: mpsc::Receiver<Result<Connection, std::io::Error>>,
        certify: Option<CertifyService>,
    ) -> Result<(), Error> {
        let stop = self.stop.clone();
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(ConfigDiscoveryServer::new(self))
            .add_optional_service(
                certify.map(weft_proto::identity::v1::certificates_server::CertificatesServer::new),
            )
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), stop.cancelled_owned())
            .await
            .map_err(Error::Serve)
    }

    /// The caller's identity, or why the call is refused.
    fn caller<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(Option<SocketAddr>, weft_identity::SpiffeId), Status> {
        let info = request.extensions().get::<PeerInfo>();
        match info.and_then(|i| i.identity.clone()) {
            Some(id) if id.trust_domain() != self.trust_domain => {
                self.metrics.record_error("grpc_forbidden");
                Err(Status::permission_denied(format!("{id} is not of trust domain {}", self.trust_domain)))
            }
            Some(id) => Ok((info.and_then(|i| i.remote), id)),
            None => {
                self.metrics.record_error("grpc_unauthenticated");
                Err(Status::unauthenticated("a client certificate from the mesh CA is required"))
            }
        }
    }
}

/// Whether `identity` may receive the config of node `<pod>.<namespace>`: only its own namespace's.
pub fn may_subscribe(identity: &weft_identity::SpiffeId, node: &str) -> bool {
    node.rsplit_once('.').is_some_and(|(_, ns)| ns == identity.namespace())
}

/// What one proxy is given: the services it subscribed to (names resolved from its namespace,
/// or virtual addresses), the services their routes lead to, and its own inbound policy.
pub fn view(snapshot: &Snapshot, node: &str, subscribed: &BTreeSet<String>) -> pb::ConfigUpdate {
    let namespace = node.rsplit_once('.').map_or("", |(_, ns)| ns);
    let domain = &snapshot.cluster_domain;
    let services = &snapshot.resolution.services;
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut unresolved = Vec::new();
    for name in subscribed {
        let fqdn = match address(name) {
            Some(ip) => snapshot.resolution.by_address.get(&ip).cloned(),
            None => Some(index::fqdn(name, namespace, domain)).filter(|f| services.contains_key(f)),
        };
        match fqdn {
            Some(f) => {
                wanted.insert(f);
            }
            None => unresolved.push(name.clone()),
        }
    }
    // The closure over route destinations: the proxy must know every service it may forward to.
    let mut pending: Vec<String> = wanted.iter().cloned().collect();
    while let Some(name) = pending.pop() {
        if let Some(svc) = services.get(&name) {
            for dep in Resolution::dependencies(svc) {
                if services.contains_key(&dep) && wanted.insert(dep.clone()) {
                    pending.push(dep);
                }
            }
        }
    }
    let local_suffix = format!(".{namespace}.svc.{domain}");
    let config_services = wanted
        .iter()
        .filter_map(|name| services.get(name))
        .map(|svc| {
            let mut svc = svc.as_ref().clone();
            // The bare short name reaches a service only from its own namespace.
            if let Some(short) = svc.name.strip_suffix(&local_suffix) {
                svc.aliases.insert(0, short.to_owned());
            }
            svc
        })
        .collect();
    let mut update = pb::ConfigUpdate {
        version: String::new(),
        config: Some(pb::ProxyConfig {
            version: String::new(),
            services: config_services,
            // Inside the config, so the proxy applies it atomically with the services; the
            // version below hashes it too.
            inbound: snapshot.resolution.workloads.get(node).map(|p| p.as_ref().clone()),
        }),
        unresolved,
    };
    let version = format!("{:016x}", content_hash(&update));
    update.version = version.clone();
    if let Some(c) = update.config.as_mut() {
        c.version = version;
    }
    update
}

/// Every service in the mesh (the `Watch` RPC).
pub fn full_config(snapshot: &Snapshot) -> pb::ProxyConfig {
    let mut config = pb::ProxyConfig {
        version: String::new(),
        services: snapshot.resolution.services.values().map(|s| s.as_ref().clone()).collect(),
        // The `Watch` RPC serves no particular workload.
        inbound: None,
    };
    config.version = format!("{:016x}", content_hash(&config));
    config
}

/// `ip` or `ip:port` (IPv6 in brackets with a port) to the IP as a string.
fn address(name: &str) -> Option<String> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Some(ip.to_string());
    }
    name.parse::<SocketAddr>().ok().map(|a| a.ip().to_string())
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;
type ConfigStream = Pin<Box<dyn Stream<Item = Result<pb::ProxyConfig, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscovery for ConfigServer {
    type WatchStream = ConfigStream;
    type SubscribeStream = UpdateStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<ConfigStream>, Status> {
        let (_, caller) = self.caller(&request)?;
        if caller.namespace() != self.mesh_namespace {
            self.metrics.record_error("grpc_forbidden");
            return Err(Status::permission_denied(format!(
                "{caller} may not watch every service: only identities of namespace {}",
                self.mesh_namespace
            )));
        }
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let mut snapshots = self.snapshots.clone();
        let stop = self.stop.clone();
        let mut last = request.version;
        tokio::spawn(async move {
            loop {
                let snapshot = snapshots.borrow_and_update().clone();
                if let Some(snapshot) = snapshot {
                    let config = full_config(&snapshot);
                    if config.version != last {
                        last = config.version.clone();
                        if tx.send(Ok(config)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    r = snapshots.changed() => if r.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let (peer, caller) = self.caller(&request)?;
        let mut requests = request.into_inner();
        // The first message names the node; a client that sends none is not waited for forever.
        let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, requests.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => {
                self.metrics.record_error("subscribe_invalid");
                return Err(Status::invalid_argument("the stream ended before its first message"));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                self.metrics.record_error("subscribe_timeout");
                return Err(Status::deadline_exceeded("no SubscribeRequest within 10s"));
            }
        };
        if first.node.is_empty() || !first.node.contains('.') {
            self.metrics.record_error("subscribe_invalid");
            return Err(Status::invalid_argument("node must be <pod>.<namespace>"));
        }
        if !may_subscribe(&caller, &first.node) {
            self.metrics.record_error("grpc_forbidden");
            return Err(Status::permission_denied(format!(
                "{caller} may not subscribe as node {}: only nodes of namespace {}",
                first.node,
                caller.namespace()
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let stream = Subscription {
            node: first.node.clone(),
            subscribed: BTreeSet::new(),
            last_version: first.version.clone(),
            snapshots: self.snapshots.clone(),
            metrics: self.metrics.clone(),
            stop: self.stop.clone(),
        };
        let span = info_span!("subscribe", node = %first.node, identity = %caller, peer = ?peer);
        tokio::spawn(stream.run(first, requests, tx).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One proxy's subscription.
struct Subscription {
    node: String,
    subscribed: BTreeSet<String>,
    last_version: String,
    snapshots: Snapshots,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Subscription {
    async fn run(
        mut self,
        first: pb::SubscribeRequest,
        mut requests: Streaming<pb::SubscribeRequest>,
        tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
    ) {
        let connected = self.metrics.connected().clone();
        connected.inc();
        info!("proxy connected");
        self.apply(&first);
        let mut requests_open = true;
        loop {
            if !self.push(&tx).await {
                break;
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tx.closed() => break,
                r = self.snapshots.changed() => if r.is_err() { break },
                msg = requests.message(), if requests_open => match msg {
                    Ok(Some(msg)) => self.apply(&msg),
                    // The proxy half-closed: keep pushing until it goes.
                    Ok(None) => requests_open = false,
                    Err(status) => {
                        debug!(%status, "request stream failed");
                        break;
                    }
                },
            }
        }
        connected.dec();
        info!("proxy disconnected");
    }

    fn apply(&mut self, msg: &pb::SubscribeRequest) {
        for name in &msg.unsubscribe {
            self.subscribed.remove(name);
        }
        for name in &msg.subscribe {
            if self.subscribed.len() < MAX_SUBSCRIPTIONS {
                self.subscribed.insert(name.clone());
            }
        }
        debug!(subscribe = ?msg.subscribe, unsubscribe = ?msg.unsubscribe, total = self.subscribed.len(), "subscriptions");
    }

    /// Sends the current view if its version differs from what the proxy has. False when the
    /// proxy is gone.
    async fn push(&mut self, tx: &mpsc::Sender<Result<pb::ConfigUpdate, Status>>) -> bool {
        let Some(snapshot) = self.snapshots.borrow_and_update().clone() else {
            // Not synced yet: the proxy keeps what it has.
            return true;
        };
        let update = view(&snapshot, &self.node, &self.subscribed);
        if update.version == self.last_version {
            return true;
        }
        let version = update.version.clone();
        let services = update.config.as_ref().map_or(0, |c| c.services.len());
        // Counted as it is handed to the stream, so a proxy that has it can see it counted.
        self.metrics.record_push(snapshot.changed_at.elapsed().as_secs_f64());
        if tx.send(Ok(update)).await.is_err() {
            return false;
        }
        debug!(%version, services, generation = snapshot.generation, "pushed");
        self.last_version = version;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn svc(name: &str, deps: &[&str]) -> Arc<pb::Service> {
        let route = deps
            .iter()
            .map(|d| pb::WeightedDestination {
                destination: Some(pb::Destination { host: (*d).into(), ..Default::default() }),
                weight: 1,
                ..Default::default()
            })
            .collect();
        Arc::new(pb::Service {
            name: name.into(),
            aliases: vec![],
            http_routes: if deps.is_empty() {
                vec![]
            } else {
                vec![pb::HttpRoute { route, ..Default::default() }]
            },
            ..Default::default()
        })
    }

    fn snapshot() -> Snapshot {
        let a = "a.shop.svc.cluster.local";
        let b = "b.shop.svc.cluster.local";
        let c = "c.other.svc.cluster.local";
        let d = "d.shop.svc.cluster.local";
        let resolution = Resolution {
            services: BTreeMap::from([
                (a.into(), svc(a, &[b])),
                (b.into(), svc(b, &[c, a])),
                (c.into(), svc(c, &[])),
                (d.into(), svc(d, &[])),
            ]),
            by_address: BTreeMap::from([("10.0.0.4".into(), d.into())]),
            workloads: BTreeMap::from([(
                "web-1.shop".into(),
                Arc::new(pb::InboundPolicy { workload: "web-1.shop".into(), ..Default::default() }),
            )]),
            ..Resolution::default()
        };
        Snapshot {
            generation: 1,
            resolution,
            cluster_domain: "cluster.local".into(),
            changed_at: tokio::time::Instant::now(),
        }
    }

    fn names(update: &pb::ConfigUpdate) -> Vec<&str> {
        update.config.as_ref().unwrap().services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_view_holds_what_was_asked_for_and_where_its_routes_lead() {
        let snap = snapshot();
        let asked = BTreeSet::from(["a".to_owned()]);
        let v = view(&snap, "web-1.shop", &asked);
        assert_eq!(
            names(&v),
            ["a.shop.svc.cluster.local", "b.shop.svc.cluster.local", "c.other.svc.cluster.local"]
        );
        assert_eq!(v.config.as_ref().unwrap().services[0].aliases, ["a"], "short name in its own namespace");
        assert!(v.config.as_ref().unwrap().services[2].aliases.is_empty(), "no short name across namespaces");
        assert_eq!(v.config.as_ref().unwrap().inbound.as_ref().unwrap().workload, "web-1.shop");
        assert_eq!(v.config.as_ref().unwrap().version, v.version);

        let nothing = view(&snap, "web-1.shop", &BTreeSet::new());
        assert!(names(&nothing).is_empty());
        assert_ne!(nothing.version, v.version);
    }

    #[test]
    fn addresses_and_qualified_names_resolve_and_unknown_names_are_listed() {
        let snap = snapshot();
        let asked = BTreeSet::from([
            "10.0.0.4:80".to_owned(),
            "c.other".to_owned(),
            "zzz".to_owned(),
            "10.9.9.9".to_owned(),
        ]);
        let v = view(&snap, "x.elsewhere", &asked);
        assert_eq!(names(&v), ["c.other.svc.cluster.local", "d.shop.svc.cluster.local"]);
        assert_eq!(v.unresolved, ["10.9.9.9", "zzz"]);
        assert!(v.config.as_ref().unwrap().inbound.is_none(), "not a known pod");
    }

    #[test]
    fn the_inbound_policy_travels_in_the_config_and_its_changes_change_the_version() {
        let asked = BTreeSet::from(["a".to_owned()]);
        let before = view(&snapshot(), "web-1.shop", &asked);
        let mut snap = snapshot();
        snap.resolution.workloads.insert(
            "web-1.shop".into(),
            Arc::new(pb::InboundPolicy {
                workload: "web-1.shop".into(),
                mtls_mode: pb::MtlsMode::MtlsStrict as i32,
                ..Default::default()
            }),
        );
        let after = view(&snap, "web-1.shop", &asked);
        let config = after.config.as_ref().unwrap();
        assert_eq!(config.inbound.as_ref().unwrap().mtls_mode(), pb::MtlsMode::MtlsStrict);
        assert_eq!(names(&after), names(&before), "same services");
        assert_ne!(after.version, before.version, "the version covers the inbound policy");
        assert_eq!(config.version, after.version);
    }

    #[test]
    fn equal_content_has_equal_versions() {
        let asked = BTreeSet::from(["a".to_owned()]);
        assert_eq!(view(&snapshot(), "p.shop", &asked).version, view(&snapshot(), "p.shop", &asked).version);
        assert_eq!(full_config(&snapshot()).services.len(), 4);
        assert_eq!(full_config(&snapshot()).version, full_config(&snapshot()).version);
    }
}
