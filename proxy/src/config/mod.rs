//! The running configuration: a validated, compiled, immutable `Snapshot` of a
//! `weft.proxy.v1.ProxyConfig`, held in a `Store` and swapped whole. Readers load an `Arc` without
//! taking a lock (arc-swap); a request keeps the snapshot it started with until it ends.

mod compile;
pub mod control_plane;
pub mod file;
pub mod policy;
#[cfg(test)]
mod proptests;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::sync::watch;
use weft_proto::v1::ProxyConfig;

pub use compile::{Error, compile};

use crate::{
    balance::Policy,
    resilience::{
        ClusterState,
        budget::BudgetPolicy,
        limits::PoolLimits,
        outlier::{OutlierPolicy, honour_ejections},
    },
    route::{Match, Redirect},
    upstream::{ConnectOpts, Endpoint},
};
use policy::{Fault, HashOn, Mirror, RetryPolicy};

/// How a port's traffic is handled (the proto `Protocol`, compiled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Detect,
    Http1,
    Http2,
    Tcp,
}

/// A compiled config.
#[derive(Debug)]
pub struct Snapshot {
    pub version: String,
    /// The config as loaded, for `/config`.
    pub source: ProxyConfig,
    pub services: Vec<Arc<Service>>,
    /// This workload's inbound policy; `None` accepts plain text and mTLS and denies nothing.
    pub inbound: Option<Arc<crate::inbound::Inbound>>,
    by_host: HashMap<String, usize>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Every endpoint by address, so the next snapshot can reuse their state.
    endpoints: HashMap<SocketAddr, Arc<Endpoint>>,
    /// Every cluster's counters by name, so the next snapshot can reuse them.
    cluster_states: HashMap<Arc<str>, Arc<ClusterState>>,
}

#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub ports: Vec<Port>,
    pub http_routes: Vec<HttpRoute>,
    pub tcp_routes: Vec<Split>,
}

#[derive(Debug)]
pub struct Port {
    pub number: u16,
    pub protocol: Protocol,
    /// All the port's endpoints with the service's policy: the default destination.
    pub cluster: Arc<Cluster>,
}

/// A set of endpoints that one destination (service, subset, port) resolves to.
#[derive(Debug)]
pub struct Cluster {
    /// `service|subset|port`, for logs and access logs.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub policy: Policy,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub rr: AtomicUsize,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// Sticky sessions: requests with the same key go to the same endpoint.
    pub hash: Option<HashOn>,
    pub limits: PoolLimits,
    /// HTTP/1.1 over HTTP/2 between proxies (`ConnectOpts::http1_over_h2`); `None`: the proxy's
    /// default.
    pub h2_upgrade: Option<bool>,
    pub outlier: Option<OutlierPolicy>,
    pub budget: BudgetPolicy,
    /// Budget and pool counters, carried over from the previous snapshot's cluster of this name.
    pub state: Arc<ClusterState>,
}

#[derive(Debug)]
pub struct HttpRoute {
    pub name: Arc<str>,
    /// Any one holds (empty: always).
    pub matches: Vec<Match>,
    pub action: Action,
    pub rewrite: Option<Rewrite>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Bounds all tries together, response body included.
    pub timeout: Option<Duration>,
    pub fault: Option<Fault>,
    pub retry: RetryPolicy,
    pub mirror: Option<Mirror>,
}

#[derive(Debug)]
pub enum Action {
    Forward(Split),
    Redirect(Redirect),
    Direct { status: StatusCode, body: Bytes },
}

/// Weighted destinations; one is picked per request (or per TCP connection).
#[derive(Debug)]
pub struct Split {
    pub targets: Vec<Target>,
}

#[derive(Debug)]
pub struct Target {
    pub weight: u32,
    pub service: Arc<str>,
    /// Port number to cluster; a destination without a port has one per port of its service.
    pub clusters: Vec<(u16, Arc<Cluster>)>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

impl Split {
    /// Picks a target, uniformly at random by weight (per request, or per TCP connection).
    pub fn pick(&self) -> Option<&Target> {
        let total: u64 = self.targets.iter().map(|t| u64::from(t.weight)).sum();
        if self.targets.is_empty() {
            return None;
        }
        let i =
            crate::route::pick_weighted(self.targets.iter().map(|t| t.weight), fastrand::u64(..total.max(1)));
        self.targets.get(i)
    }
}

impl Cluster {
    /// Picks an endpoint for a request: by `key` when the cluster hashes (rendezvous hashing, so
    /// a key keeps its endpoint while that endpoint stays), else by the balancing policy. Skips
    /// endpoints already `tried` by this request while others remain, and, with outlier
    /// detection, ejected ones while enough stay in.
    pub fn pick(&self, key: Option<u64>, tried: &[SocketAddr]) -> Option<&Arc<Endpoint>> {
        let now = tokio::time::Instant::now();
        let eps = &self.endpoints;
        // Ejections count only with outlier detection, and only while enough endpoints stay in.
        let skip_ejected = self.outlier.as_ref().is_some_and(|o| {
            let ejected = eps.iter().filter(|e| e.health.is_ejected(now)).count();
            ejected > 0 && honour_ejections(eps.len() - ejected, eps.len(), o.min_health_percent)
        });
        if !skip_ejected && tried.is_empty() && key.is_none() {
            return self.choose(eps.len(), |i| &eps[i], now);
        }
        let usable = |e: &&Arc<Endpoint>| !(skip_ejected && e.health.is_ejected(now));
        let mut candidates: Vec<&Arc<Endpoint>> =
            eps.iter().filter(usable).filter(|e| !tried.contains(&e.addr)).collect();
        if candidates.is_empty() {
            candidates = eps.iter().filter(usable).collect();
        }
        match key {
            Some(key) => candidates.into_iter().max_by_key(|e| rendezvous(key, e.addr)),
            None => self.choose(candidates.len(), |i| candidates[i], now),
        }
    }

    /// The balancing policy's choice among `n` endpoints, the i-th being `at(i)`.
    fn choose<'e>(
        &self,
        n: usize,
        at: impl Fn(usize) -> &'e Arc<Endpoint>,
        now: tokio::time::Instant,
    ) -> Option<&'e Arc<Endpoint>> {
        let i = crate::balance::choose(
            self.policy,
            n,
            |i| at(i).load.cost(self.policy, now),
            &self.rr,
            |k| fastrand::usize(..k),
        )?;
        Some(at(i))
    }

    /// The HTTP version to speak to this cluster's endpoints: the port's declared protocol, else
    /// the downstream's.
    pub fn upstream_proto(&self, downstream: crate::upstream::Proto) -> crate::upstream::Proto {
        match self.protocol {
            Protocol::Http1 => crate::upstream::Proto::Http1,
            Protocol::Http2 => crate::upstream::Proto::Http2,
            Protocol::Detect | Protocol::Tcp => downstream,
        }
    }

    /// `base` with this destination's connection-pool overrides.
    pub fn connect_opts(&self, base: ConnectOpts) -> ConnectOpts {
        ConnectOpts {
            connect_timeout: self.connect_timeout.unwrap_or(base.connect_timeout),
            idle_timeout: self.idle_timeout.unwrap_or(base.idle_timeout),
            max_requests_per_connection: self.limits.max_requests_per_connection,
            http1_over_h2: self.h2_upgrade.unwrap_or(base.http1_over_h2),
            ..base
        }
    }

    /// Endpoints out of balancing now (for the ejection share check).
    pub fn ejected(&self) -> usize {
        let now = tokio::time::Instant::now();
        self.endpoints.iter().filter(|e| e.health.is_ejected(now)).count()
    }
}

/// The weight of `addr` for `key` in rendezvous (highest random weight) hashing.
fn rendezvous(key: u64, addr: SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    addr.hash(&mut h);
    h.finish()
}

impl Target {
    /// The cluster for a request that arrived for `port`: the matching one, else the first.
    pub fn cluster(&self, port: Option<u16>) -> &Arc<Cluster> {
        let found = port.and_then(|p| self.clusters.iter().find(|(n, _)| *n == p));
        &found.unwrap_or(&self.clusters[0]).1
    }
}

#[derive(Debug, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Set, then add, then remove.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<HeaderValue>,
}

impl Snapshot {
    /// The service a `Host`/`:authority` names (lowercase, without the port).
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host.get(host).map(|&i| &self.services[i])
    }

    /// The service owning a virtual address (`vip:port`), with that port.
    pub fn service_by_addr(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &Port)> {
        let svc = &self.services[*self.by_addr.get(&addr)?];
        let port = svc.port(addr.port())?;
        Some((svc, port))
    }

    pub(crate) fn endpoint(&self, addr: &SocketAddr) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(addr)
    }

    pub(crate) fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }

    pub(crate) fn cluster_state(&self, name: &str) -> Option<&Arc<ClusterState>> {
        self.cluster_states.get(name)
    }
}

impl Service {
    pub fn port(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// The port a request for `number` uses: that one, else the only one.
    pub fn port_or_only(&self, number: Option<u16>) -> Option<&Port> {
        match number.and_then(|n| self.port(n)) {
            Some(p) => Some(p),
            None if self.ports.len() == 1 => self.ports.first(),
            None => None,
        }
    }
}

/// The latest good snapshot plus what the last load attempt said. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    current: ArcSwapOption<Snapshot>,
    status: watch::Sender<Status>,
}

/// The outcome of the latest load attempt, for `/config` and tests.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Increases on every attempt, good or bad.
    pub attempts: u64,
    pub loaded_at: Option<SystemTime>,
    /// Why the latest attempt was rejected (the running config stays the previous good one).
    pub last_error: Option<String>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            inner: Arc::new(StoreInner {
                current: ArcSwapOption::empty(),
                status: watch::channel(Status::default()).0,
            }),
        }
    }
}

impl Store {
    /// The running snapshot, if any config was ever loaded. Lock-free (arc-swap).
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.inner.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.inner.current.load().is_some()
    }

    /// Compiles and installs `config`, or keeps the running one and records why not.
    pub fn apply(&self, config: ProxyConfig) -> Result<Arc<Snapshot>, Error> {
        let previous = self.current();
        match compile(config, previous.as_deref()) {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                self.inner.current.store(Some(snapshot.clone()));
                self.inner.status.send_modify(|s| {
                    s.attempts += 1;
                    s.loaded_at = Some(SystemTime::now());
                    s.last_error = None;
                });
                Ok(snapshot)
            }
            Err(e) => {
                self.reject(e.to_string());
                Err(e)
            }
        }
    }

    /// Records a failed load attempt (the running config is kept).
    pub fn reject(&self, why: String) {
        self.inner.status.send_modify(|s| {
            s.attempts += 1;
            s.last_error = Some(why);
        });
    }

    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// Changes whenever a load attempt finishes.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.inner.status.subscribe()
    }
}
