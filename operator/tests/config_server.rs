//! The config server in-process on loopback, driven by hand-made snapshots and a real tonic
//! client over TLS with certificates from a test CA: the stream protocol and who may open which
//! stream, without a cluster.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use weft_identity::{Credentials, SpiffeId, TrustBundle, ca::Issuer, tls as mesh};
use weft_operator::{
    ca::serving::{self, ServingTls},
    controllers::Snapshot,
    index::Resolution,
    metrics::Metrics,
    server::ConfigServer,
};
use weft_proto::v1::{self as pb, config_discovery_client::ConfigDiscoveryClient};

const A: &str = "a.shop.svc.cluster.local";
const B: &str = "b.shop.svc.cluster.local";
const D: &str = "d.shop.svc.cluster.local";
const BOUND: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(86_400);
/// The operator's name as proxies dial it.
const OPERATOR: &str = "weft-operator.weft-system.svc";

/// Services a (routing to b), b and d; `port` varies a's port so its content changes.
fn snapshot(generation: u64, a_port: u32, d_port: u32) -> Option<Arc<Snapshot>> {
    let svc = |name: &str, port: u32, to: Option<&str>| {
        Arc::new(pb::Service {
            name: name.into(),
            ports: vec![pb::ServicePort { number: port, ..Default::default() }],
            http_routes: to
                .map(|to| {
                    vec![pb::HttpRoute {
                        route: vec![pb::WeightedDestination {
                            destination: Some(pb::Destination { host: to.into(), ..Default::default() }),
                            weight: 1,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }]
                })
                .unwrap_or_default(),
            ..Default::default()
        })
    };
    let inbound = pb::InboundPolicy {
        workload: "web-1.shop".into(),
        mtls_mode: pb::MtlsMode::MtlsStrict as i32,
        ..Default::default()
    };
    let resolution = Resolution {
        workloads: BTreeMap::from([("web-1.shop".to_owned(), Arc::new(inbound))]),
        services: BTreeMap::from([
            (A.into(), svc(A, a_port, Some(B))),
            (B.into(), svc(B, 80, None)),
            // D has a virtual address, as a Service's ClusterIP.
            (
                D.into(),
                Arc::new(pb::Service {
                    addresses: vec!["10.0.0.4".into()],
                    ..(*svc(D, d_port, None)).clone()
                }),
            ),
        ]),
        by_address: BTreeMap::from([("10.0.0.4".to_owned(), D.to_owned())]),
        ..Resolution::default()
    };
    Some(Arc::new(Snapshot {
        generation,
        resolution,
        cluster_domain: "cluster.local".into(),
        changed_at: tokio::time::Instant::now(),
    }))
}

struct Server {
    addr: std::net::SocketAddr,
    ca: Issuer,
    publish: watch::Sender<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", namespace, service_account).unwrap()
}

async fn serve() -> Server {
    let (publish, snapshots) = watch::channel(None);
    let metrics = Arc::new(Metrics::default());
    let stop = CancellationToken::new();
    let ca = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let issued = ca
        .issue_with_dns(&id("weft-system", "weft-operator"), &[OPERATOR.to_owned()], SystemTime::now(), DAY)
        .unwrap();
    let creds = Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let serving = Arc::new(ServingTls::default());
    serving.set(mesh::control_server_config(&creds, &bundle(&ca)).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = serving::incoming(listener, serving, metrics.clone(), stop.clone());
    let server = ConfigServer::new(
        snapshots,
        metrics.clone(),
        "weft-system".into(),
        "cluster.local".into(),
        stop.clone(),
    );
    tokio::spawn(server.serve(incoming, None));
    Server { addr, ca, publish, metrics, stop }
}

fn bundle(ca: &Issuer) -> TrustBundle {
    TrustBundle::from_pem(ca.root_pem().as_bytes()).unwrap()
}

impl Server {
    /// A client with a certificate for `namespace` (or none).
    async fn channel(&self, namespace: Option<&str>) -> tonic::transport::Channel {
        let creds = namespace.map(|ns| {
            let issued = self.ca.issue(&id(ns, "web"), SystemTime::now(), DAY).unwrap();
            Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
        });
        let tls = mesh::control_client_config(&bundle(&self.ca), creds.as_ref()).unwrap();
        weft_proxy::grpc::connect(&self.addr.to_string(), OPERATOR, tls).await.unwrap()
    }

    async fn client(&self, namespace: &str) -> ConfigDiscoveryClient<tonic::transport::Channel> {
        ConfigDiscoveryClient::new(self.channel(Some(namespace)).await)
    }
}

struct Sub {
    requests: mpsc::UnboundedSender<pb::SubscribeRequest>,
    updates: tonic::Streaming<pb::ConfigUpdate>,
}

impl Sub {
    async fn open(server: &Server, first: pb::SubscribeRequest) -> Sub {
        let (requests, rx) = mpsc::unbounded_channel();
        requests.send(first).unwrap();
        let updates = server
            .client("shop")
            .await
            .subscribe(UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Sub { requests, updates }
    }

    async fn next(&mut self) -> pb::ConfigUpdate {
        tokio::time::timeout(BOUND, self.updates.message())
            .await
            .expect("an update in time")
            .unwrap()
            .unwrap()
    }
}

fn names(u: &pb::ConfigUpdate) -> Vec<&str> {
    u.config.as_ref().unwrap().services.iter().map(|s| s.name.as_str()).collect()
}

fn a_port(u: &pb::ConfigUpdate) -> u32 {
    u.config.as_ref().unwrap().services.iter().find(|s| s.name == A).unwrap().ports[0].number
}

fn first(version: &str, subscribe: &[&str]) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        node: "web-1.shop".into(),
        subscribe: subscribe.iter().map(|s| (*s).to_owned()).collect(),
        unsubscribe: vec![],
        version: version.into(),
    }
}

#[tokio::test]
async fn a_stream_gets_a_full_snapshot_then_only_changes_it_can_see() {
    let server = serve().await;
    let mut sub = Sub::open(&server, first("", &["a"])).await;
    // Nothing is served before the first snapshot; the first one arrives whole.
    server.publish.send_replace(snapshot(1, 80, 80));
    let update = sub.next().await;
    assert_eq!(names(&update), [A, B], "a and where its routes lead");
    assert_eq!(update.config.as_ref().unwrap().version, update.version);
    // The node's own inbound policy travels inside the config, applied with the services.
    let inbound = update.config.as_ref().unwrap().inbound.as_ref().expect("the node's inbound policy");
    assert_eq!(inbound.workload, "web-1.shop");
    assert_eq!(inbound.mtls_mode(), pb::MtlsMode::MtlsStrict, "its own inbound policy");
    let v1 = update.version.clone();

    // A change to a service this proxy does not hold is not pushed: the next update it gets
    // is the one that changes a.
    server.publish.send_replace(snapshot(2, 80, 81));
    server.publish.send_replace(snapshot(3, 8080, 81));
    let update = sub.next().await;
    assert_eq!(a_port(&update), 8080);
    assert_ne!(update.version, v1);

    // Lazily adding a destination pushes a config with it.
    sub.requests.send(pb::SubscribeRequest { subscribe: vec![D.into()], ..Default::default() }).unwrap();
    let update = sub.next().await;
    assert_eq!(names(&update), [A, B, D]);
    // ...and removing it takes it out again.
    sub.requests.send(pb::SubscribeRequest { unsubscribe: vec![D.into()], ..Default::default() }).unwrap();
    assert_eq!(names(&sub.next().await), [A, B]);
    let text = server.metrics.encode();
    assert!(text.contains("weft_operator_connected_proxies 1"), "{text}");
    assert!(text.contains("weft_operator_pushes_total 4"), "{text}");
    server.stop.cancel();
}

#[tokio::test]
async fn a_reconnecting_proxy_that_is_up_to_date_gets_no_redundant_push() {
    let server = serve().await;
    server.publish.send_replace(snapshot(1, 80, 80));
    let mut sub = Sub::open(&server, first("", &["a"])).await;
    let version = sub.next().await.version;
    drop(sub);

    let mut again = Sub::open(&server, first(&version, &["a"])).await;
    // The first message this stream sees is the next change, not a copy of what it has.
    server.publish.send_replace(snapshot(2, 9090, 80));
    assert_eq!(a_port(&again.next().await), 9090);
    server.stop.cancel();
}

#[tokio::test]
async fn a_first_message_without_a_node_is_refused_and_watch_streams_everything() {
    let server = serve().await;
    server.publish.send_replace(snapshot(1, 80, 80));
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::SubscribeRequest::default()).unwrap();
    let status = server.client("shop").await.subscribe(UnboundedReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("<pod>.<namespace>"));

    let mut watch = server
        .client("weft-system")
        .await
        .watch(pb::WatchRequest { node: "tool.x".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    let all = tokio::time::timeout(BOUND, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(all.services.len(), 3);
    server.publish.send_replace(snapshot(2, 80, 99));
    let next = tokio::time::timeout(BOUND, watch.message()).await.unwrap().unwrap().unwrap();
    assert_ne!(next.version, all.version);
    server.stop.cancel();
}

/// A stream is opened only for the caller's own namespace, only with a certificate, and the
/// whole mesh is watched only from the mesh namespace.
#[tokio::test]
async fn streams_are_authorized_by_the_callers_certificate() {
    let server = serve().await;
    server.publish.send_replace(snapshot(1, 80, 80));
    let subscribe = |channel: tonic::transport::Channel| async move {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(first("", &["a"])).unwrap();
        ConfigDiscoveryClient::new(channel).subscribe(UnboundedReceiverStream::new(rx)).await.map(|_| ())
    };
    let anonymous = subscribe(server.channel(None).await).await.unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated, "{anonymous:?}");
    let other = subscribe(server.channel(Some("other")).await).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    assert!(other.message().contains("spiffe://cluster.local/ns/other/sa/web"), "{other:?}");
    subscribe(server.channel(Some("shop")).await).await.expect("its own namespace");

    let watch = server.client("shop").await.watch(pb::WatchRequest::default()).await.unwrap_err();
    assert_eq!(watch.code(), tonic::Code::PermissionDenied, "{watch:?}");
    let text = server.metrics.encode();
    assert!(text.contains(r#"weft_operator_errors_total{reason="grpc_forbidden"} 2"#), "{text}");
    assert!(text.contains(r#"weft_operator_errors_total{reason="grpc_unauthenticated"} 1"#), "{text}");

    // Another trust domain, even signed by this CA (a root shared by meshes), is refused.
    let stranger = SpiffeId::new("other.example", "shop", "web").unwrap();
    let issued = server.ca.issue(&stranger, SystemTime::now(), DAY).unwrap();
    let creds = Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let tls = mesh::control_client_config(&bundle(&server.ca), Some(&creds)).unwrap();
    let channel = weft_proxy::grpc::connect(&server.addr.to_string(), OPERATOR, tls).await.unwrap();
    let denied = subscribe(channel).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // A client certificate from another CA fails the handshake: no call reaches the server.
    let foreign = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let issued = foreign.issue(&id("shop", "web"), SystemTime::now(), DAY).unwrap();
    let creds = Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let tls = mesh::control_client_config(&bundle(&server.ca), Some(&creds)).unwrap();
    let refused = match weft_proxy::grpc::connect(&server.addr.to_string(), OPERATOR, tls).await {
        Err(_) => true,
        Ok(channel) => subscribe(channel).await.is_err(),
    };
    assert!(refused, "a client certificate from a foreign CA was accepted");

    // A client that does not trust the CA never gets as far as a call.
    let foreign = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let tls = mesh::control_client_config(&bundle(&foreign), None).unwrap();
    assert!(weft_proxy::grpc::connect(&server.addr.to_string(), OPERATOR, tls).await.is_err());
    server.stop.cancel();
}

/// The real proxy's control-plane source against this server: it installs updates, subscribes
/// lazily at run time, and keeps its running config when an update does not compile.
#[tokio::test]
async fn a_real_proxy_installs_updates_subscribes_lazily_and_keeps_its_config_on_a_bad_one() {
    let server = serve().await;
    server.publish.send_replace(snapshot(1, 80, 80));
    let mut settings = weft_proxy::Settings::loopback("/nonexistent".into());
    let mut cp = weft_proxy::config::control_plane::ControlPlane::new(
        server.addr.to_string(),
        "web-1.shop",
        vec!["a".into()],
    );
    cp.server_name = OPERATOR.into();
    settings.control_plane = Some(cp);
    let issued = server.ca.issue(&id("shop", "web"), SystemTime::now(), DAY).unwrap();
    let dir = std::env::temp_dir().join(format!("weft-config-server-{}", std::process::id()));
    let files = weft_proxy::settings::IdentityFiles::write(
        &dir,
        &issued.cert_pem,
        &issued.key_pem,
        server.ca.root_pem(),
    )
    .unwrap();
    settings.identity = Some(weft_proxy::settings::IdentitySource::Files(files));
    let proxy = weft_proxy::start(settings).await.unwrap();
    let mut status = proxy.store.subscribe();
    let wait = |status: &mut watch::Receiver<weft_proxy::config::Status>, attempts: u64| {
        let mut status = status.clone();
        async move {
            tokio::time::timeout(BOUND, status.wait_for(|s| s.attempts >= attempts)).await.unwrap().unwrap();
        }
    };
    wait(&mut status, 1).await;
    let names = |proxy: &weft_proxy::Handle| -> Vec<String> {
        proxy.store.current().unwrap().services.iter().map(|s| s.name.to_string()).collect()
    };
    assert_eq!(names(&proxy), [A, B]);
    assert!(proxy.store.current().unwrap().service_by_host("a").is_some(), "short name in its namespace");
    // Its own inbound policy came with the config and runs: STRICT on every port.
    let running = proxy.store.current().unwrap();
    let inbound = running.inbound.as_ref().expect("the proxy runs its inbound policy");
    assert_eq!(inbound.workload, "web-1.shop");
    assert_eq!(inbound.mtls(8080), weft_proxy::inbound::MtlsMode::Strict);

    // Lazily: the app dials a virtual address that no service in the proxy's config owns (what
    // the outbound listener does on a routing miss); the operator answers with its service.
    let control_plane = proxy.control_plane.as_ref().unwrap();
    assert!(control_plane.subscribe_lazily("10.0.0.4".parse().unwrap()));
    assert!(!control_plane.subscribe_lazily("10.0.0.4".parse().unwrap()), "each address is asked for once");
    wait(&mut status, 2).await;
    assert_eq!(names(&proxy), [A, B, D]);
    let version = proxy.store.current().unwrap().version.clone();

    // An update the proxy cannot compile (port 0) is rejected; the running config stays.
    server.publish.send_replace(snapshot(2, 0, 80));
    wait(&mut status, 3).await;
    assert_eq!(proxy.store.current().unwrap().version, version);
    assert!(proxy.store.status().last_error.is_some());

    // The next good one is installed.
    server.publish.send_replace(snapshot(3, 81, 80));
    wait(&mut status, 4).await;
    assert_ne!(proxy.store.current().unwrap().version, version);
    assert!(proxy.store.status().last_error.is_none());

    // Before passing an unknown destination through, a proxy with an identity waits for the
    // control plane's answer: yes for an address the config has, a prompt no for one the
    // operator does not know (so it is not the timeout that answered).
    let known: std::net::SocketAddr = "10.0.0.4:80".parse().unwrap();
    assert!(control_plane.await_answer(known, &proxy.store, BOUND).await);
    let unknown: std::net::SocketAddr = "10.9.9.9:80".parse().unwrap();
    assert!(control_plane.subscribe_lazily(unknown.ip()));
    let asked = tokio::time::Instant::now();
    assert!(!control_plane.await_answer(unknown, &proxy.store, BOUND).await);
    assert!(asked.elapsed() < BOUND / 2, "the operator answered; it did not time out");
    proxy.shutdown();
    server.stop.cancel();
}
