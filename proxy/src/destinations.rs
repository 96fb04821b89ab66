//! How the proxy reaches what it forwards to, for the HTTP router and the TCP path alike: the
//! running config (`Store`), endpoints for destinations the config does not know (passthrough,
//! pooled like any other), lazy subscription to unknown virtual addresses, and the connect
//! options (this proxy's identity).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use crate::{
    config::{Snapshot, Store, control_plane::Subscriptions},
    settings::Timeouts,
    tls::IdentityStore,
    upstream::{ConnectOpts, Endpoint},
};

/// How long a connection to an unknown destination waits for the control plane's answer
/// before passing through (the control plane answers in milliseconds; it is away otherwise).
pub const LAZY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Passthrough endpoints kept at most; the map is cleared when full.
const MAX_PASSTHROUGH: usize = 1024;

#[derive(Debug)]
pub struct Destinations {
    pub store: Store,
    /// The operator's stream, when the config comes from it: routing misses subscribe lazily.
    control_plane: Option<Subscriptions>,
    /// This proxy's mesh identity (empty without a source, until it first loads, or once it
    /// expired).
    pub identity: Arc<IdentityStore>,
    /// The proxy has an identity source: meshed endpoints are refused without a certificate.
    pub require_identity: bool,
    timeouts: Timeouts,
    /// Endpoints for destinations the config does not know (original destinations passed
    /// through). Every inbound request looks here, so lookups share a read lock; only a new
    /// address takes the write lock.
    passthrough: RwLock<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl Destinations {
    pub fn new(
        store: Store,
        control_plane: Option<Subscriptions>,
        identity: Arc<IdentityStore>,
        require_identity: bool,
        timeouts: Timeouts,
    ) -> Destinations {
        Destinations {
            store,
            control_plane,
            identity,
            require_identity,
            timeouts,
            passthrough: RwLock::default(),
        }
    }

    /// Closes the pooled upstream connections idle past their timeout, of the config's endpoints
    /// and the passthrough ones (`Endpoint::reap_idle`). Returns how many.
    pub fn reap_idle(&self, now: tokio::time::Instant) -> usize {
        let configured = self.store.current().map_or(0, |s| s.endpoints().map(|e| e.reap_idle(now)).sum());
        let passthrough = self.passthrough.read().unwrap_or_else(|e| e.into_inner());
        configured + passthrough.values().map(|e| e.reap_idle(now)).sum::<usize>()
    }

    /// The endpoint for an address: the config's, else a pooled passthrough one.
    pub fn passthrough(&self, snapshot: &Snapshot, addr: SocketAddr) -> Arc<Endpoint> {
        if let Some(e) = snapshot.endpoint(&addr) {
            return e.clone();
        }
        if let Some(e) = self.passthrough.read().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            return e.clone();
        }
        let mut map = self.passthrough.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_PASSTHROUGH && !map.contains_key(&addr) {
            map.clear();
        }
        map.entry(addr).or_insert_with(|| Endpoint::new(addr)).clone()
    }

    /// How to reach endpoints: the identity to present, and whether one is required (a
    /// destination's pool settings are added by `Cluster::connect_opts`).
    pub fn connect_opts(&self) -> ConnectOpts {
        ConnectOpts::new(&self.timeouts, self.identity.current(), self.require_identity)
    }

    /// Ready to serve: a config is loaded, and the identity too when one is configured.
    pub fn is_ready(&self) -> bool {
        self.store.is_ready() && (!self.require_identity || self.identity.current().is_some())
    }

    /// An outbound connection to `destination` matched no service: with a control plane, ask it
    /// about that virtual address (see `Subscriptions::subscribe_lazily`).
    pub fn subscribe_lazily(&self, destination: SocketAddr) {
        if let Some(control_plane) = &self.control_plane
            && control_plane.subscribe_lazily(destination.ip())
        {
            tracing::debug!(%destination, "subscribing to an unknown destination");
        }
    }

    /// Asks about an unknown `destination` and, when this proxy has an identity (so the
    /// destination may be a meshed Service it has not heard of, which must not get plain text),
    /// waits up to [`LAZY_ANSWER_WAIT`] for the answer. True when the config now has it.
    pub async fn resolve_lazily(&self, destination: SocketAddr) -> bool {
        self.subscribe_lazily(destination);
        match &self.control_plane {
            Some(control_plane) if self.require_identity => {
                control_plane.await_answer(destination, &self.store, LAZY_ANSWER_WAIT).await
            }
            _ => false,
        }
    }
}
