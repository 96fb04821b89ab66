//! Wiring: binds the listeners, starts the config source and the admin server, hands each
//! accepted connection to protocol detection and then to the HTTP server or the TCP splice, and
//! drains on shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::{either::Either, sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    config::{Cluster, Protocol, Snapshot, Store, control_plane, file::FileSource},
    conn::Conn,
    destinations::Destinations,
    detect::{self, Detected},
    http::{
        Direction, INBOUND, PASSTHROUGH,
        observe::AccessLog,
        router::{ConnInfo, Routing},
        server::{self, Serving},
    },
    inbound::{Facts, Inbound, MtlsMode},
    io::PrefixedIo,
    metrics::{
        GaugeGuard, HandshakeLabels, ListenerLabels, Metrics, PeerLabels, ReasonLabels, ResultLabels,
        TcpLabels,
    },
    peer::{MeshClient, Peer},
    settings::{IdentityFiles, IdentitySource, Settings},
    sys, tcp,
    tls::{self as mesh, Accepted, IdentityStore, MeshTls},
    upstream::{ConnectOpts, Endpoint, Proto, UpstreamIo},
};
use weft_identity::Tunnel;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// What the connection tasks share: the HTTP server's context (which holds the router's), and
/// what the TCP path and drain need.
#[derive(Debug)]
struct Shared {
    settings: Settings,
    serving: Arc<Serving>,
    /// Every connection task, so drain can wait for them.
    tracker: TaskTracker,
}

impl Shared {
    fn destinations(&self) -> &Destinations {
        &self.serving.routing.destinations
    }

    fn metrics(&self) -> &Arc<Metrics> {
        &self.serving.routing.metrics
    }

    fn drain(&self) -> &CancellationToken {
        &self.serving.drain
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Handle {
    pub admin_addr: SocketAddr,
    /// Bound addresses of the explicit listeners, in the order given.
    pub explicit_addrs: Vec<SocketAddr>,
    pub outbound_addr: Option<SocketAddr>,
    pub inbound_addr: Option<SocketAddr>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// With a control-plane source: add or remove destinations, see the stream state.
    pub control_plane: Option<control_plane::Subscriptions>,
    shared: Arc<Shared>,
    reload: Arc<Notify>,
    /// Cancelled to ask for shutdown (SIGTERM, `POST /shutdown`, `Handle::shutdown`).
    shutdown: CancellationToken,
    /// Cancelled once drain is over.
    done: CancellationToken,
}

impl Handle {
    /// Re-reads the config file now (what SIGHUP does).
    pub fn reload(&self) {
        self.reload.notify_one();
    }

    /// Starts draining; see `wait`.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.shared.drain().is_cancelled()
    }

    /// Resolves when a shutdown was asked for and drain has finished (or hit its deadline).
    pub async fn wait(&self) {
        self.done.cancelled().await;
    }
}

/// Starts a proxy: loads the config (a failure leaves it running but not ready), binds every
/// listener and returns once they accept.
pub async fn start(settings: Settings) -> Result<Handle, Error> {
    let store = Store::default();
    let metrics = Metrics::new();
    let access_log = settings.access_log.then(|| AccessLog::spawn(metrics.clone()));
    start_with(settings, store, metrics, access_log).await
}

/// `start` with the store, metrics and access log given (tests).
pub async fn start_with(
    settings: Settings,
    store: Store,
    metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
) -> Result<Handle, Error> {
    let shutdown = CancellationToken::new();
    let done = CancellationToken::new();
    let reload = Arc::new(Notify::new());
    let identity = Arc::new(IdentityStore::default());
    let control_plane = match &settings.control_plane {
        // Ready once the first update arrives; the last config stays through disconnects.
        Some(cp) => Some(control_plane::spawn(cp.clone(), store.clone(), identity.clone(), done.clone())),
        None => {
            // The first load happens before the listeners open, so a good file makes the proxy
            // ready at once.
            let mut source = FileSource::new(settings.config_path.clone(), store.clone());
            let first = source.reload(true).await;
            report(&metrics, first);
            tokio::spawn(config_loop(
                source,
                settings.config_poll_interval,
                reload.clone(),
                done.clone(),
                metrics.clone(),
            ));
            None
        }
    };
    let destinations = Arc::new(Destinations::new(
        store.clone(),
        control_plane.clone(),
        identity,
        settings.identity.is_some(),
        settings.timeouts.clone(),
    ));
    let tracker = TaskTracker::new();
    let routing = Arc::new(Routing {
        destinations: destinations.clone(),
        inbound_forward_ip: settings.inbound_forward_ip,
        metrics: metrics.clone(),
        upgrades: tracker.clone(),
        mirrors: Arc::new(Semaphore::new(crate::http::mirror::MAX_IN_FLIGHT)),
    });
    let serving = Arc::new(Serving {
        routing,
        limits: settings.limits.clone(),
        timeouts: settings.timeouts.clone(),
        access_log,
        drain: CancellationToken::new(),
        workload: settings.workload.clone(),
        namespace: settings.namespace.clone(),
        flood_log: Serving::new_flood_log(),
    });
    let admin = Arc::new(admin::Admin {
        destinations: destinations.clone(),
        metrics: metrics.clone(),
        drain: serving.drain.clone(),
        app_health: crate::probes::AppHealth::from_settings(&settings),
    });
    let shared = Arc::new(Shared { settings: settings.clone(), serving, tracker });

    match settings.identity.clone() {
        Some(IdentitySource::Files(files)) => {
            // Loaded before the listeners open, so a proxy with good files never accepts a
            // connection it cannot tunnel.
            let fingerprint = mesh::fingerprint(&files).await;
            load_identity(&shared, &files).await;
            tokio::spawn(identity_loop(files, fingerprint, shared.clone(), done.clone()));
        }
        // Not ready (and meshed endpoints refused) until the CA's first certificate arrives.
        Some(IdentitySource::Ca(ca)) => {
            tokio::spawn(crate::certify::run(
                ca,
                destinations.identity.clone(),
                metrics.clone(),
                done.clone(),
            ));
        }
        None => {}
    }

    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| Error::Bind { what, addr, source })
    };
    let admin_listener = bind("admin", settings.admin_addr).await?;
    let admin_addr = admin_listener.local_addr().map_err(|source| Error::Bind {
        what: "admin",
        addr: settings.admin_addr,
        source,
    })?;
    let mut explicit_addrs = Vec::new();
    let mut listeners = Vec::new();
    let explicit = settings.explicit.iter().map(|l| {
        let listening =
            Listening { direction: Direction::Explicit, target: l.target.clone(), app_port: None };
        ("explicit", l.addr, listening)
    });
    let inbound = settings.inbound_explicit.iter().map(|l| {
        let listening = Listening { direction: Direction::Inbound, target: None, app_port: Some(l.app_port) };
        ("inbound", l.addr, listening)
    });
    for (what, addr, listening) in explicit.chain(inbound) {
        let listener = bind(what, addr).await?;
        explicit_addrs.push(listener.local_addr().map_err(|source| Error::Bind { what, addr, source })?);
        listeners.push((listener, listening));
    }
    let mut outbound_addr = None;
    let mut inbound_addr = None;
    let redirect =
        [(settings.outbound_addr, Direction::Outbound), (settings.inbound_addr, Direction::Inbound)];
    for (addr, direction) in redirect {
        let Some(addr) = addr else { continue };
        let what = direction.as_str();
        let listener = bind(what, addr).await?;
        let local = listener.local_addr().map_err(|source| Error::Bind { what, addr, source })?;
        match direction {
            Direction::Outbound => outbound_addr = Some(local),
            _ => inbound_addr = Some(local),
        }
        listeners.push((listener, Listening { direction, target: None, app_port: None }));
    }

    for (listener, listening) in listeners {
        let limit = Arc::new(Semaphore::new(settings.limits.max_connections));
        tokio::spawn(accept_loop(listener, listening, shared.clone(), limit));
    }

    let handle = Handle {
        admin_addr,
        explicit_addrs,
        outbound_addr,
        inbound_addr,
        store,
        metrics,
        control_plane,
        shared: shared.clone(),
        reload,
        shutdown: shutdown.clone(),
        done: done.clone(),
    };
    tokio::spawn(reap_idle_upstreams(shared.clone(), done.clone()));
    tokio::spawn(admin::serve(admin_listener, admin, shutdown.clone(), done.clone()));
    tokio::spawn(drain(shared, shutdown, done));
    Ok(handle)
}

/// Logs and counts one config load attempt.
fn report(metrics: &Metrics, outcome: Option<Result<Arc<Snapshot>, crate::config::file::Error>>) {
    let result = match outcome {
        None => return,
        Some(Ok(s)) => {
            tracing::info!(version = %s.version, services = s.services.len(), "config loaded");
            "ok"
        }
        Some(Err(error)) => {
            tracing::warn!(%error, "config rejected; keeping the running config");
            "error"
        }
    };
    metrics.config_reloads.get_or_create(&ResultLabels { result }).inc();
}

/// Loads the identity files; a bad set keeps the running identity (if any) and says why.
async fn load_identity(shared: &Shared, files: &IdentityFiles) {
    let result = match MeshTls::load(files, std::time::SystemTime::now()).await {
        Ok(tls) => {
            tracing::info!(identity = %tls.creds.id, not_after = ?tls.creds.not_after, "identity loaded");
            shared.metrics().identity_expiry.set(tls.expiry_unix());
            shared.destinations().identity.set(tls);
            "ok"
        }
        Err(error) => {
            let keeping = shared.destinations().identity.current().map(|t| t.creds.id.to_string());
            tracing::warn!(%error, ?keeping, "identity rejected; keeping the running one");
            "error"
        }
    };
    shared.metrics().identity_reloads.get_or_create(&ResultLabels { result }).inc();
}

/// Reloads the identity when its files change (polled like the config file), until `stop`.
async fn identity_loop(
    files: IdentityFiles,
    mut fingerprint: Vec<Option<(std::time::SystemTime, u64)>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let poll = shared.settings.config_poll_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = mesh::fingerprint(&files).await;
        if now != fingerprint {
            fingerprint = now;
            load_identity(&shared, &files).await;
        }
    }
}

/// Reloads when the file changes (polled) and on every `reload` notification (SIGHUP), until
/// `stop`.
async fn config_loop(
    mut source: FileSource,
    poll: Duration,
    reload: Arc<Notify>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    // The first load already happened at start.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => false,
            _ = reload.notified() => true,
        };
        report(&metrics, source.reload(force).await);
    }
}

/// Waits for a shutdown request, then drains: listeners stop accepting, HTTP connections close
/// gracefully (GOAWAY on HTTP/2), and in-flight work gets until the deadline.
async fn drain(shared: Arc<Shared>, shutdown: CancellationToken, done: CancellationToken) {
    shutdown.cancelled().await;
    let deadline = shared.settings.timeouts.drain;
    tracing::info!(?deadline, in_flight = shared.tracker.len(), "draining");
    shared.drain().cancel();
    shared.tracker.close();
    if tokio::time::timeout(deadline, shared.tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = shared.tracker.len(),
            "drain deadline passed; closing remaining connections"
        );
    } else {
        tracing::info!("drained");
    }
    done.cancel();
}

/// How often pooled upstream connections idle past their timeout are closed: the timeout
/// (`--upstream-idle-timeout`, a pool's `idleTimeoutMs`) is kept to within this.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Downstream connections that must have closed since the busiest moment, or HTTP/1 connections
/// parked since the last release, before free memory is handed back to the kernel.
const RELEASE_AFTER_CLOSED: usize = 64;

/// Whether a burst ended since memory was last released: pooled upstream connections were just
/// closed, the open downstream connections fell well below their peak, or many connections
/// parked (each freed its HTTP/1 buffers) since then. Walking the allocator's heaps on every
/// tick of an idle proxy would be wasted.
fn burst_ended(upstream_closed: usize, downstream_peak: usize, downstream_open: usize, parked: u64) -> bool {
    upstream_closed > 0
        || downstream_peak >= downstream_open + RELEASE_AFTER_CLOSED
        || parked >= RELEASE_AFTER_CLOSED as u64
}

/// Until the proxy is done: closes idle pooled upstream connections, so a burst's connections
/// and their buffers go once idle whether or not another request comes, and then hands the
/// memory they held back to the kernel (`sys::release_free_memory`): RSS falls back toward
/// idle instead of staying at the burst's peak.
async fn reap_idle_upstreams(shared: Arc<Shared>, done: CancellationToken) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak = 0;
    let parks = &shared.metrics().http1_parks;
    let mut parks_before = parks.get();
    // The release runs a tick after a burst is seen to end: closed connections' tasks free their
    // buffers only once they finish, after the tick that closed them.
    let mut release_due = false;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            now = tick.tick() => {
                let closed = shared.destinations().reap_idle(now);
                // Connection tasks: one per downstream connection.
                let open = shared.tracker.len();
                peak = peak.max(open);
                let parked = parks.get() - parks_before;
                if std::mem::replace(&mut release_due, false) {
                    let released = crate::sys::release_free_memory();
                    tracing::debug!(released, "a burst ended; released free memory");
                }
                if burst_ended(closed, peak, open, parked) {
                    tracing::debug!(closed, peak, open, parked, "a burst ended");
                    release_due = true;
                    peak = open;
                    parks_before += parked;
                }
            }
        }
    }
}

/// What a listener's connections are.
#[derive(Clone, Debug)]
struct Listening {
    direction: Direction,
    /// An explicit listener's fixed destination.
    target: Option<(String, u16)>,
    /// An explicit inbound listener's app port: connections are inbound to it, as if redirected.
    app_port: Option<u16>,
}

/// Accepts connections for one listener.
async fn accept_loop(
    listener: TcpListener,
    listening: Listening,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
) {
    let direction = listening.direction;
    let labels = ListenerLabels { listener: direction.as_str() };
    loop {
        let accepted = tokio::select! {
            _ = shared.drain().cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!(%error, listener = direction.as_str(), "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.metrics().connections_rejected.get_or_create(&labels).inc();
            tracing::debug!(%peer, listener = direction.as_str(), "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let active = shared.metrics().connections_active.get_or_create(&labels).clone();
        // Spawned as it is: a wrapping `async` block would keep a second copy of the arguments
        // in every connection's task.
        let connection = handle_connection(stream, peer, listening.clone(), shared.clone(), permit, active);
        shared.tracker.spawn(connection);
    }
    tracing::debug!(listener = direction.as_str(), "listener closed");
}

async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    listening: Listening,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
    active: Gauge,
) {
    let _active = GaugeGuard::inc(active);
    let shared = &shared;
    let Listening { direction, target, app_port } = listening;
    let dst = match (direction, app_port) {
        (Direction::Inbound, Some(port)) => match stream.local_addr() {
            Ok(local) => Some(SocketAddr::new(local.ip(), port)),
            Err(_) => return,
        },
        (Direction::Outbound | Direction::Inbound, _) => match sys::original_dst(&stream) {
            // A connection made straight to the listener (not redirected) would loop back into
            // the proxy.
            Ok(dst) if stream.local_addr().is_ok_and(|local| local == dst) => {
                tracing::warn!(%peer, listener = direction.as_str(), "connection was not redirected; closing");
                return;
            }
            Ok(dst) => Some(dst),
            Err(error) => {
                tracing::warn!(%peer, %error, listener = direction.as_str(), "no original destination; closing");
                return;
            }
        },
        (Direction::Explicit, _) => None,
    };
    let conn = Conn { direction, peer, dst, target };
    let declared = declared_protocol(shared, &conn);
    // Mesh tunnels end on the inbound and explicit listeners, whatever the port carries inside,
    // so there the first bytes are always read (a mesh client speaks first: its ClientHello).
    // On the outbound listener TLS is the app's own and goes out as it came. `--opaque-ports`
    // are never read.
    let opaque_port = conn.port().is_some_and(|p| shared.settings.opaque_ports.contains(&p));
    // The workload's mTLS mode for this port (PeerAuthentication); outbound has none.
    let mode = match (direction, conn.dst) {
        (Direction::Inbound, Some(dst)) => {
            inbound_policy(shared).map_or(MtlsMode::Permissive, |p| p.mtls(dst.port()))
        }
        _ => MtlsMode::Permissive,
    };
    let mesh = shared
        .destinations()
        .identity
        .current()
        .filter(|_| direction != Direction::Outbound && !opaque_port && mode != MtlsMode::Disable);
    // STRICT accepts mesh tunnels only: without an identity to end them (none yet, or an opaque
    // port), nothing can be accepted.
    if mode == MtlsMode::Strict && mesh.is_none() {
        return refuse(shared, &conn, "no_mesh_identity");
    }
    let (detected, prefix, stream) = if declared == Protocol::Detect || mesh.is_some() {
        let mut stream = stream;
        match detect::detect(&mut stream, shared.settings.timeouts.detect).await {
            Ok((Detected::Tls, prefix)) if mesh.is_some() => (Detected::Tls, prefix, stream),
            Ok((d, prefix)) => (d.as_declared(declared), prefix, stream),
            Err(error) => {
                tracing::debug!(%peer, %error, "connection failed during detection");
                return;
            }
        }
    } else {
        (Detected::Opaque.as_declared(declared), bytes::Bytes::new(), stream)
    };
    let (Detected::Tls, Some(tls)) = (detected, mesh) else {
        if mode == MtlsMode::Strict {
            return refuse(shared, &conn, "plaintext");
        }
        return dispatch(stream, prefix, detected, conn, None, shared).await;
    };
    // Boxed: the TLS states would otherwise size every connection's task, plain ones included
    // (+6 KiB per idle keep-alive connection, BENCHMARKS.md M4).
    Box::pin(serve_tunnel(stream, prefix, tls, conn, mode, shared)).await
}

/// This workload's compiled inbound policy, when the config has one.
fn inbound_policy(shared: &Shared) -> Option<Arc<Inbound>> {
    shared.destinations().store.current()?.inbound.clone()
}

/// Closes an inbound connection that the workload's mTLS mode does not accept.
fn refuse(shared: &Shared, conn: &Conn, reason: &'static str) {
    shared.metrics().inbound_refused.get_or_create(&ReasonLabels { reason }).inc();
    tracing::debug!(peer = %conn.peer, port = ?conn.port(), reason, "connection refused by the mTLS mode (STRICT)");
}

/// Terminates a mesh tunnel (or replays TLS that is not one) and serves what it carries.
async fn serve_tunnel(
    stream: TcpStream,
    prefix: bytes::Bytes,
    tls: Arc<MeshTls>,
    conn: Conn,
    mode: MtlsMode,
    shared: &Arc<Shared>,
) {
    let labels = |result| HandshakeLabels { side: "accept", result };
    let accepted = mesh::accept(stream, prefix, &tls, shared.settings.timeouts.tls_handshake).await;
    drop(tls); // a renewed identity must not wait for this connection to end
    match accepted {
        Ok(Accepted::Mesh(tunneled)) => {
            shared.metrics().tls_handshakes.get_or_create(&labels("ok")).inc();
            let mesh::Tunneled { io, peer: client, tunnel } = *tunneled;
            tracing::trace!(peer = %conn.peer, client = %client, ?tunnel, "mesh tunnel accepted");
            let client = MeshClient {
                peer: Peer::new(Some(client), ""),
                sni: io.get_ref().1.server_name().map(Arc::from),
                http1_over_h2: tunnel == Tunnel::Http1OverH2,
            };
            dispatch(io, bytes::Bytes::new(), tunnel.into(), conn, Some(client), shared).await
        }
        // TLS that is not a mesh tunnel (the client's own): plain text as far as the mesh knows.
        Ok(Accepted::Other { .. }) if mode == MtlsMode::Strict => refuse(shared, &conn, "tls_not_mesh"),
        Ok(Accepted::Other { prefix, io }) => {
            dispatch(io, prefix, Detected::Opaque, conn, None, shared).await
        }
        Err(error) => {
            shared.metrics().tls_handshakes.get_or_create(&labels("error")).inc();
            tracing::debug!(peer = %conn.peer, %error, "mesh TLS handshake failed");
        }
    }
}

/// Serves a connection (plain, or the inside of a mesh tunnel from `tunnel`) as `detected`.
/// Not `async` itself: it decides at once and returns the future that serves, so the
/// connection's task does not also keep these arguments for as long as the connection lives.
fn dispatch<I>(
    stream: I,
    prefix: bytes::Bytes,
    detected: Detected,
    conn: Conn,
    tunnel: Option<MeshClient>,
    shared: &Arc<Shared>,
) -> impl Future<Output = ()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match detected.http() {
        Some(downstream) => {
            let origin = match &tunnel {
                Some(t) if t.http1_over_h2 => Proto::Http1,
                _ => downstream,
            };
            let (tunnel, sni) = tunnel.map_or((None, None), |t| (Some(t.peer), t.sni));
            // An `Arc` from here on: the connection's task holds it once, not once per nested future.
            let info = Arc::new(ConnInfo { conn, downstream, origin, tunnel, sni });
            let header_read = shared.settings.timeouts.header_read;
            Either::Left(serve_http(stream, prefix, info, shared.serving.clone(), header_read))
        }
        // Boxed: the connect and splice states would otherwise size every connection's task,
        // HTTP ones included (parked HTTP/1 connections hold little else).
        None => Either::Right(Box::pin(forward_tcp(stream, prefix, conn, tunnel, shared.clone()))),
    }
}

/// Serves HTTP, after reading the rest of an HTTP/2 preface: detection has read it whole, a
/// declared port or a tunnel not yet.
async fn serve_http<I>(
    mut stream: I,
    prefix: bytes::Bytes,
    info: Arc<ConnInfo>,
    serving: Arc<Serving>,
    header_read: Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let prefix = match info.downstream {
        Proto::Http2 => match detect::h2_preface(&mut stream, prefix, header_read).await {
            Some(prefix) => prefix,
            None => return tracing::debug!(peer = %info.conn.peer, "no HTTP/2 connection preface; closed"),
        },
        Proto::Http1 => prefix,
    };
    server::serve(PrefixedIo::new(prefix, stream), info, serving).await
}

/// Passes an opaque TCP connection to its destination, byte for byte.
async fn forward_tcp<I>(
    mut stream: I,
    prefix: bytes::Bytes,
    conn: Conn,
    tunnel: Option<MeshClient>,
    shared: Arc<Shared>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shared = &shared;
    let peer = conn.peer;
    if conn.direction == Direction::Inbound && !authorize_tcp(shared, &conn, tunnel.as_ref()) {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        return;
    }
    let tunnel = tunnel.map(|t| t.peer);
    let mut destination = tcp_destination(shared, &conn);
    // An unknown outbound destination: ask the control plane before passing it through.
    if let (Direction::Outbound, Some(d), Some(found)) = (conn.direction, conn.dst, &destination)
        && Arc::ptr_eq(&found.service, &*PASSTHROUGH)
        && shared.destinations().resolve_lazily(d).await
    {
        destination = tcp_destination(shared, &conn);
    }
    let Some(mut destination) = destination else {
        tracing::debug!(%peer, "no TCP destination; closing");
        return;
    };
    let t = &shared.settings.timeouts;
    let upstream = match destination.connect().await {
        Ok(u) => u,
        Err(error) => {
            tracing::debug!(%peer, %error, "TCP upstream connect failed");
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            return;
        }
    };
    let TcpDestination { endpoint, service, opts, .. } = destination;
    let upstream_tls = endpoint.is_tunneled(opts.mesh.as_deref());
    let direction = conn.direction;
    let labels = TcpLabels {
        direction: direction.as_str(),
        peers: PeerLabels::new(
            direction,
            &shared.serving.local_peer(),
            tunnel.as_ref(),
            Some(&endpoint.peer),
        ),
        destination_service: service,
        tls: tunnel.is_some() || upstream_tls,
    };
    match tcp::splice(stream, prefix, upstream, t.tcp_idle, shared.metrics(), labels).await {
        Ok(t) => {
            tracing::debug!(%peer, upstream = %endpoint.addr, received = t.received, sent = t.sent, "TCP connection closed")
        }
        Err(error) => tracing::debug!(%peer, %error, "TCP connection ended with an error"),
    }
}

/// Decides an inbound opaque TCP connection by the workload's authorization policies (HTTP
/// requests are decided one by one in the router); counts the decision.
fn authorize_tcp(shared: &Shared, conn: &Conn, tunnel: Option<&MeshClient>) -> bool {
    let Some(policy) = inbound_policy(shared).filter(|p| p.authorizes()) else { return true };
    let facts = Facts::connection(conn, tunnel.map(|t| &t.peer), tunnel.and_then(|t| t.sni.as_deref()));
    let Some(facts) = facts else { return false };
    let decision = policy.decide_counted(&facts, Some(shared.metrics()));
    if !decision.allowed() {
        let policy = decision.decided_by();
        tracing::debug!(peer = %conn.peer, port = ?conn.port(), policy, "TCP connection denied by authorization policy");
    }
    decision.allowed()
}

/// The protocol a connection is declared to carry, when the port says so.
fn declared_protocol(shared: &Shared, conn: &Conn) -> Protocol {
    if conn.port().is_some_and(|p| shared.settings.opaque_ports.contains(&p)) {
        return Protocol::Tcp;
    }
    let Some(snapshot) = shared.destinations().store.current() else { return Protocol::Detect };
    let declared = match (conn.direction, conn.dst, &conn.target) {
        (Direction::Outbound, Some(dst), _) => snapshot.service_by_addr(dst).map(|(_, p)| p.protocol),
        (Direction::Explicit, _, Some((host, port))) => {
            snapshot.service_by_host(host).and_then(|s| s.port(*port)).map(|p| p.protocol)
        }
        _ => None,
    };
    declared.unwrap_or(Protocol::Detect)
}

/// Where an opaque TCP connection goes, and how to connect.
struct TcpDestination {
    endpoint: Arc<Endpoint>,
    service: Arc<str>,
    opts: ConnectOpts,
    /// The destination's cluster, when it is a known service: a refused connect then tries
    /// another of its endpoints once, under its retry budget (as HTTP's default retry does).
    cluster: Option<Arc<Cluster>>,
}

impl TcpDestination {
    async fn connect(&mut self) -> Result<UpstreamIo, crate::upstream::Error> {
        let Some(cluster) = &self.cluster else {
            return self.endpoint.connect(&self.opts, Tunnel::Tcp).await;
        };
        cluster.state.budget.record_request(&cluster.budget, Instant::now());
        let error = match self.endpoint.connect(&self.opts, Tunnel::Tcp).await {
            Ok(io) => return Ok(io),
            Err(error) if error.is_connect() => error,
            Err(error) => return Err(error),
        };
        let other = cluster.pick(None, &[self.endpoint.addr]).filter(|e| e.addr != self.endpoint.addr);
        match other {
            Some(other) if cluster.state.budget.try_retry(&cluster.budget, Instant::now()) => {
                tracing::debug!(%error, retry = %other.addr, "TCP connect failed; trying another endpoint");
                self.endpoint = other.clone();
                self.endpoint.connect(&self.opts, Tunnel::Tcp).await
            }
            _ => Err(error),
        }
    }
}

/// Where an opaque TCP connection goes, and how to connect: the service's TCP route (or its
/// port's endpoints, with the destination's connect settings) when the destination is a known
/// service, the original destination otherwise (the local app for inbound).
fn tcp_destination(shared: &Shared, conn: &Conn) -> Option<TcpDestination> {
    let destinations = shared.destinations();
    let snapshot = destinations.store.current()?;
    let dst = conn.dst;
    let base = destinations.connect_opts();
    let unknown = |endpoint, service| TcpDestination { endpoint, service, opts: base.clone(), cluster: None };
    if let (Direction::Inbound, Some(dst)) = (conn.direction, dst) {
        let addr = SocketAddr::new(shared.settings.inbound_forward_ip, dst.port());
        return Some(unknown(destinations.passthrough(&snapshot, addr), INBOUND.clone()));
    }
    let service = match (dst, &conn.target) {
        (Some(dst), _) => snapshot.service_by_addr(dst).map(|(s, p)| (s.clone(), p.number)),
        (None, Some((host, port))) => snapshot.service_by_host(host).map(|s| (s.clone(), *port)),
        _ => None,
    };
    match service {
        Some((svc, port)) => {
            let cluster = match svc.tcp_routes.first().and_then(|split| split.pick()) {
                Some(target) => target.cluster(Some(port)),
                None => &svc.port_or_only(Some(port))?.cluster,
            };
            let endpoint = cluster.pick(None, &[])?.clone();
            let opts = cluster.connect_opts(base.clone());
            Some(TcpDestination { endpoint, service: svc.name.clone(), opts, cluster: Some(cluster.clone()) })
        }
        None => dst.map(|d| {
            destinations.subscribe_lazily(d);
            unknown(destinations.passthrough(&snapshot, d), PASSTHROUGH.clone())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_released_after_a_burst_not_on_every_tick() {
        assert!(!burst_ended(0, 0, 0, 0), "an idle proxy");
        assert!(!burst_ended(0, 500, 480, 10), "steady traffic");
        assert!(burst_ended(0, 500, 436, 0), "64 connections closed since the peak");
        assert!(burst_ended(3, 10, 10, 0), "pooled upstream connections closed");
        assert!(burst_ended(0, 1000, 1000, 64), "64 connections parked since the last release");
    }
}
