//! The control-plane config source: a `ConfigDiscovery.Subscribe` stream to the operator
//! (`WEFT_CONTROL_PLANE`, port 15012, TLS: the operator checked against the trust bundle, this
//! proxy identified by its certificate, so the stream waits for the first one). The proxy
//! names its workload and the destinations it needs; each `ConfigUpdate` holds exactly those
//! services (and where their routes lead) and replaces the running config whole. When the stream
//! breaks, the running config stays and the client reconnects with jittered exponential backoff,
//! resubscribing to everything it had and sending the version it runs, so an unchanged config
//! is not sent again.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use weft_proto::v1::{self as pb, config_discovery_client::ConfigDiscoveryClient};

use super::Store;
use crate::tls::IdentityStore;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Connect(#[from] crate::grpc::Error),
    #[error("TLS to the control plane: {0}")]
    Tls(#[from] weft_identity::tls::Error),
    #[error("subscribing: {0}")]
    Subscribe(tonic::Status),
    #[error("the config stream failed: {0}")]
    Stream(tonic::Status),
    #[error("the control plane closed the config stream")]
    Closed,
    #[error("config version {version} rejected: {source}")]
    Invalid { version: String, source: super::Error },
}

/// Where the control plane is and who this proxy is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlane {
    /// `host:port` of the operator's config server.
    pub addr: String,
    /// The DNS name its certificate must carry (by default the host of `addr`).
    pub server_name: String,
    /// `<pod>.<namespace>`.
    pub node: String,
    /// Destinations subscribed from the start (service names or virtual addresses); more are
    /// added with [`Subscriptions::subscribe`].
    pub destinations: Vec<String>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl ControlPlane {
    pub fn new(addr: impl Into<String>, node: impl Into<String>, destinations: Vec<String>) -> ControlPlane {
        let addr = addr.into();
        ControlPlane {
            server_name: crate::grpc::host_of(&addr).to_owned(),
            addr,
            node: node.into(),
            destinations,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// The delay before reconnect attempt `attempt` (0-based): doubling from `min`, capped at `max`,
/// with up to 50% subtracted at random (`jitter` in 0..1) so proxies do not reconnect in step.
pub fn backoff(attempt: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let base = min.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(max);
    base.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
}

/// Virtual addresses subscribed on a routing miss, at most: an app that dials random addresses
/// cannot grow the proxy's (or the operator's) state without bound.
pub const MAX_LAZY_SUBSCRIPTIONS: usize = 1024;

/// Adds and removes destinations on the live stream (and on every later reconnect).
#[derive(Clone, Debug)]
pub struct Subscriptions {
    tx: mpsc::UnboundedSender<Command>,
    connected: watch::Receiver<bool>,
    /// Addresses already asked for by [`Subscriptions::subscribe_lazily`].
    lazy: Arc<Mutex<HashSet<IpAddr>>>,
    /// What the control plane does not know, as of its last update (ticks on every update).
    unresolved: watch::Receiver<Arc<HashSet<String>>>,
}

#[derive(Debug)]
enum Command {
    Subscribe(String),
    Unsubscribe(String),
}

impl Subscriptions {
    pub fn subscribe(&self, name: impl Into<String>) {
        let _ = self.tx.send(Command::Subscribe(name.into()));
    }

    /// Lazy discovery: the app dialed `destination`, which no service in the config owns. Asks
    /// the operator for whatever service has that virtual address; meanwhile connections pass
    /// through to the original destination, and once the answer arrives they are routed. Each
    /// address is asked for once; past [`MAX_LAZY_SUBSCRIPTIONS`] nothing more is asked.
    /// Returns whether a subscription was sent.
    pub fn subscribe_lazily(&self, destination: IpAddr) -> bool {
        let mut lazy = self.lazy.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if lazy.len() >= MAX_LAZY_SUBSCRIPTIONS || !lazy.insert(destination) {
            return false;
        }
        drop(lazy);
        self.subscribe(destination.to_string());
        true
    }

    /// Waits until the control plane has answered for `destination`: true once the config
    /// holds a service with that address and port, false when the control plane says it knows
    /// none, or when no answer came within `timeout` (the control plane is away). A proxy with an
    /// identity waits here before passing an unknown destination through, so a meshed Service
    /// it has not heard of yet is not reached in plain text.
    pub async fn await_answer(
        &self,
        destination: std::net::SocketAddr,
        store: &Store,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut unresolved = self.unresolved.clone();
        let ip = destination.ip().to_string();
        loop {
            let not_known = unresolved.borrow_and_update().contains(&ip);
            if store.current().is_some_and(|s| s.service_by_addr(destination).is_some()) {
                return true;
            }
            if not_known {
                return false;
            }
            match tokio::time::timeout_at(deadline, unresolved.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    pub fn unsubscribe(&self, name: impl Into<String>) {
        let _ = self.tx.send(Command::Unsubscribe(name.into()));
    }

    /// True while a stream is open.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }
}

/// Starts the client; it runs until `stop`. Streams open once `identity` holds a certificate.
pub fn spawn(
    settings: ControlPlane,
    store: Store,
    identity: Arc<IdentityStore>,
    stop: CancellationToken,
) -> Subscriptions {
    let (tx, rx) = mpsc::unbounded_channel();
    let (connected_tx, connected) = watch::channel(false);
    let (unresolved_tx, unresolved) = watch::channel(Arc::default());
    let client = Client {
        wanted: settings.destinations.iter().cloned().collect(),
        settings,
        store,
        identity,
        commands: rx,
        connected: connected_tx,
        unresolved: unresolved_tx,
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = client.run() => {}
        }
    });
    Subscriptions { tx, connected, lazy: Arc::default(), unresolved }
}

struct Client {
    settings: ControlPlane,
    store: Store,
    identity: Arc<IdentityStore>,
    wanted: BTreeSet<String>,
    commands: mpsc::UnboundedReceiver<Command>,
    connected: watch::Sender<bool>,
    unresolved: watch::Sender<Arc<HashSet<String>>>,
}

impl Client {
    async fn run(mut self) {
        let mut attempt = 0;
        loop {
            let mut received = false;
            let error = self.session(&mut received).await;
            self.connected.send_replace(false);
            if received {
                attempt = 0;
            }
            let delay =
                backoff(attempt, self.settings.backoff_min, self.settings.backoff_max, fastrand::f64());
            attempt = attempt.saturating_add(1);
            tracing::warn!(%error, addr = %self.settings.addr, retry_in = ?delay, "control plane unavailable; keeping the running config");
            tokio::time::sleep(delay).await;
        }
    }

    /// One stream, until it fails. `received` turns true once an update arrived.
    async fn session(&mut self, received: &mut bool) -> Error {
        let addr = self.settings.addr.clone();
        let tls = self.identity.loaded().await;
        let config = match weft_identity::tls::control_client_config(&tls.bundle, Some(&tls.creds)) {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        drop(tls);
        let channel = match crate::grpc::connect(&addr, &self.settings.server_name, config).await {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let first = pb::SubscribeRequest {
            node: self.settings.node.clone(),
            subscribe: self.wanted.iter().cloned().collect(),
            unsubscribe: Vec::new(),
            version: self.store.current().map(|s| s.version.clone()).unwrap_or_default(),
        };
        let _ = requests.send(first);
        let mut client = ConfigDiscoveryClient::new(channel);
        let mut updates = match client.subscribe(UnboundedReceiverStream::new(requests_rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Error::Subscribe(status),
        };
        self.connected.send_replace(true);
        tracing::info!(%addr, node = %self.settings.node, subscriptions = self.wanted.len(), "control plane connected");
        loop {
            tokio::select! {
                update = updates.message() => match update {
                    Ok(Some(update)) => {
                        *received = true;
                        if let Err(error) = self.install(update) {
                            tracing::warn!(%error, "keeping the running config");
                        }
                    }
                    Ok(None) => return Error::Closed,
                    Err(status) => return Error::Stream(status),
                },
                Some(command) = self.commands.recv() => {
                    let mut msg = pb::SubscribeRequest::default();
                    match command {
                        Command::Subscribe(name) => {
                            if self.wanted.insert(name.clone()) {
                                msg.subscribe.push(name);
                            }
                        }
                        Command::Unsubscribe(name) => {
                            if self.wanted.remove(&name) {
                                msg.unsubscribe.push(name);
                            }
                        }
                    }
                    if !(msg.subscribe.is_empty() && msg.unsubscribe.is_empty()) {
                        let _ = requests.send(msg);
                    }
                }
            }
        }
    }

    fn install(&mut self, update: pb::ConfigUpdate) -> Result<(), Error> {
        let version = update.version.clone();
        if !update.unresolved.is_empty() {
            tracing::debug!(unresolved = ?update.unresolved, "subscriptions not known to the control plane yet");
        }
        let unresolved: HashSet<String> = update.unresolved.into_iter().collect();
        let mut config = update.config.unwrap_or_default();
        config.version = version.clone();
        let applied = self.store.apply(config);
        // After the store: a waiter woken by this sees the config that came with it.
        self.unresolved.send_replace(Arc::new(unresolved));
        match applied {
            Ok(snapshot) => {
                tracing::info!(version = %snapshot.version, services = snapshot.services.len(), "config from the control plane");
                Ok(())
            }
            Err(source) => Err(Error::Invalid { version, source }),
        }
    }
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn lazy_subscriptions_are_asked_once_and_bounded() {
        let stop = CancellationToken::new();
        // Nothing listens there: the client keeps retrying in the background, which is fine.
        let subscriptions = spawn(
            ControlPlane::new("127.0.0.1:9", "web-1.shop", Vec::new()),
            Store::default(),
            Arc::default(),
            stop.clone(),
        );
        let address = |i: usize| IpAddr::from([10, 96, (i / 256) as u8, (i % 256) as u8]);
        assert!(subscriptions.subscribe_lazily(address(0)));
        assert!(!subscriptions.subscribe_lazily(address(0)), "asked once");
        for i in 1..MAX_LAZY_SUBSCRIPTIONS {
            assert!(subscriptions.subscribe_lazily(address(i)));
        }
        assert!(!subscriptions.subscribe_lazily(address(MAX_LAZY_SUBSCRIPTIONS)), "bounded");
        stop.cancel();
    }

    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter_below() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..8).map(|a| backoff(a, min, max, 0.0).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(1, min, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(u32::MAX, min, max, 0.5), Duration::from_millis(3750));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_control_plane_leaves_the_store_alone_and_retries() {
        let store = Store::default();
        let stop = CancellationToken::new();
        // Port 1 on loopback refuses connections.
        let subs = spawn(
            ControlPlane::new("127.0.0.1:1", "p.ns", vec![]),
            store.clone(),
            Arc::default(),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!*subs.connected().borrow());
        assert!(store.current().is_none());
        assert_eq!(store.status().attempts, 0);
        stop.cancel();
    }
}
