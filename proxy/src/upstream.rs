//! Upstream endpoints and their connection pools.
//!
//! An `Endpoint` is one `ip:port` with its load (for the balancer) and its connections: a small
//! list of HTTP/1.1 connections, each carrying one request at a time, and one multiplexed
//! HTTP/2 connection. To a meshed endpoint, HTTP/1.1 requests may travel over a second HTTP/2
//! connection instead (`ConnectOpts::http1_over_h2`, tunnel `weft/h2-http1`): the proxy on the
//! other side gives them to its app as HTTP/1.1, so neither app notices.
//!
//! Endpoints outlive config snapshots: a new snapshot reuses the `Endpoint` of an address it
//! keeps, so latency history and pooled connections survive a reload, and a request holds its
//! `Arc<Endpoint>` so removing the endpoint from the config never cuts it off.
//!
//! The pool's lists sit behind short `std::sync::Mutex`es held only to push or pop an entry
//! (never across an `.await`), as in hyper-util's pool.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::either::Either;
use weft_identity::{SpiffeId, Tunnel};

use crate::{balance::Load, http::Body, peer::Peer, resilience::outlier::Health, tls::MeshTls};

/// A connection to an endpoint: plain, or a mesh tunnel (boxed, so plain connections do not
/// carry the TLS state's size).
pub type UpstreamIo = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// At most this many HTTP/1.1 connections are kept per endpoint (busy or idle). Each carries one
/// request at a time, so this must exceed the concurrency an endpoint sees: beyond it every
/// request opens and closes a connection of its own. At 64, 160 concurrent HTTP/2 streams
/// translated to HTTP/1.1 left about 11,000 sockets in TIME_WAIT in 3 s and cut throughput per
/// core by half (BENCHMARKS.md). Envoy's default cap per cluster is 1024 too. Idle connections
/// still close after the pool's idle timeout.
const MAX_H1_CONNS: usize = 1024;

/// Whether HTTP/1.1 requests to meshed endpoints travel over HTTP/2 between the proxies when
/// their destination does not say (DestinationRule `h2UpgradePolicy: DEFAULT`). Off: at 1000
/// rps the HTTP/2 tunnel added latency and about a tenth more CPU per request; it wins only
/// under saturation and on connection count (BENCHMARKS.md, "HTTP/1.1 over HTTP/2 between
/// proxies"), which `UPGRADE` on a destination buys.
pub const DEFAULT_HTTP1_OVER_H2: bool = false;

/// Which HTTP version to speak to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// Per-cluster connection options.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// This proxy's identity, for endpoints that run a proxy too.
    pub mesh: Option<Arc<MeshTls>>,
    /// The proxy has an identity source: without a certificate at hand (not issued yet, or
    /// expired), a meshed endpoint is refused rather than reached in plain text.
    pub require_mesh: bool,
    /// A connection is closed after carrying this many requests; 0: never.
    pub max_requests_per_connection: u32,
    /// How long a request body sent to an endpoint may stop arriving from the client before the
    /// upstream answered (`http::request_body`); zero: no limit.
    pub request_body_timeout: Duration,
    /// The average rate, in bytes/s while the proxy waits for it, below which such a body is
    /// cut, with `request_body_timeout` as the grace; zero: no minimum.
    pub request_body_min_rate: u32,
    /// HTTP/1.1 requests to a meshed endpoint travel multiplexed over one HTTP/2 tunnel rather
    /// than one tunnel per request in flight (DestinationRule `h2UpgradePolicy`). Upgrades
    /// (WebSocket) and CONNECT keep an HTTP/1.1 tunnel.
    pub http1_over_h2: bool,
}

impl ConnectOpts {
    /// The proxy's defaults; a destination's connection pool may override them
    /// (`Cluster::connect_opts`).
    pub fn new(timeouts: &crate::settings::Timeouts, mesh: Option<Arc<MeshTls>>, require_mesh: bool) -> Self {
        ConnectOpts {
            connect_timeout: timeouts.connect,
            idle_timeout: timeouts.upstream_idle,
            mesh,
            require_mesh,
            max_requests_per_connection: 0,
            request_body_timeout: timeouts.request_body,
            request_body_min_rate: timeouts.request_body_min_rate,
            http1_over_h2: DEFAULT_HTTP1_OVER_H2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("{addr} is meshed ({identity}) and this proxy has no certificate: refusing plain text")]
    NoIdentity { addr: SocketAddr, identity: SpiffeId },
    #[error("mTLS with {addr} ({identity}): {source}")]
    Tls { addr: SocketAddr, identity: SpiffeId, source: std::io::Error },
    #[error("request to {addr}: {source}")]
    Request { addr: SocketAddr, source: hyper::Error },
    #[error("{addr}'s proxy does not take HTTP/1.1 over HTTP/2 (it chose weft/http1)")]
    NoHttp1OverH2 { addr: SocketAddr },
}

impl Error {
    /// The HTTP/2 server refused the stream (REFUSED_STREAM): it did not process the request.
    pub fn is_refused_stream(&self) -> bool {
        let Error::Request { source, .. } = self else { return false };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(source);
        while let Some(e) = cause {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cause = e.source();
        }
        false
    }
}

/// A failed send, with the request when it never left.
#[derive(Debug)]
pub struct SendError {
    pub error: Error,
    pub unsent: Option<Request<Body>>,
}

impl Error {
    /// Failed before any byte of the request could reach the endpoint.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            Error::ConnectTimeout { .. }
                | Error::Connect { .. }
                | Error::Handshake { .. }
                | Error::NoIdentity { .. }
                | Error::Tls { .. }
                | Error::NoHttp1OverH2 { .. }
        )
    }
}

/// One upstream address.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub peer: Peer,
    pub load: Arc<Load>,
    /// Outlier detection's failure counts and ejection.
    pub health: Health,
    h1: Mutex<H1Pool>,
    /// For HTTP/2 requests (tunnel `weft/h2`).
    h2: H2Slot,
    /// For HTTP/1.1 requests carried over HTTP/2 (tunnel `weft/h2-http1`).
    h1_over_h2: H2Slot,
    /// The endpoint's proxy answered an offer of `weft/h2-http1` with `weft/http1`: it predates
    /// the tunnel, so HTTP/1.1 requests to it take HTTP/1.1 tunnels.
    no_http1_over_h2: AtomicBool,
}

/// One multiplexed HTTP/2 connection, made when first needed.
#[derive(Debug, Default)]
struct H2Slot {
    /// The connection, with the requests it carried and when it expires unused (`reap_idle`).
    conn: Mutex<Option<(http2::SendRequest<Body>, u32, Instant)>>,
    /// Held while the connection is being established, so concurrent requests share it.
    connecting: tokio::sync::Mutex<()>,
}

/// The HTTP/1.1 connections of one endpoint, busy and idle, roughly in the order they were
/// returned (a checkout's `swap_remove` moves the last one into the gap). Closed and expired
/// ones are dropped by `reap_idle`, once a second.
#[derive(Debug, Default)]
struct H1Pool {
    conns: Vec<H1Conn>,
}

#[derive(Debug)]
struct H1Conn {
    sender: http1::SendRequest<Body>,
    /// Last returned plus the idle timeout: not handed out after, and closed by `reap_idle`.
    expires: Instant,
    /// Requests carried so far.
    requests: u32,
}

impl Endpoint {
    /// An endpoint nothing is known about (passthrough destinations, the local app).
    pub fn new(addr: SocketAddr) -> Arc<Endpoint> {
        Endpoint::with_peer(addr, Peer::default())
    }

    pub fn with_peer(addr: SocketAddr, peer: Peer) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr,
            peer,
            load: Arc::new(Load::new(Instant::now())),
            health: Health::new(Instant::now()),
            h1: Mutex::new(H1Pool::default()),
            h2: H2Slot::default(),
            h1_over_h2: H2Slot::default(),
            no_http1_over_h2: AtomicBool::new(false),
        })
    }

    /// Sends one request, reusing a pooled connection when one is free. A request that never
    /// left (no connection could be had) comes back with the error, body unread.
    pub async fn send(
        &self,
        req: Request<Body>,
        proto: Proto,
        opts: &ConnectOpts,
    ) -> Result<Response<Incoming>, SendError> {
        if let Err(error) = self.check_identity(opts) {
            return Err(SendError { error, unsent: Some(req) });
        }
        match proto {
            Proto::Http1 if self.carries_http1_over_h2(&req, opts) => {
                // Sent as it is (origin form, `Host`, HTTP/1.1): the h2 crate gives such a
                // request `:scheme` and `:path` and keeps `Host`, and the proxy on the other
                // side hands it to its app in the same form.
                match self.send_h2(req, opts, Tunnel::Http1OverH2).await {
                    Err(SendError { error: Error::NoHttp1OverH2 { .. }, unsent: Some(req) }) => {
                        self.send_h1(req, opts).await
                    }
                    sent => sent,
                }
            }
            Proto::Http1 => self.send_h1(req, opts).await,
            Proto::Http2 => self.send_h2(req, opts, Tunnel::Http2).await,
        }
    }

    async fn send_h1(
        &self,
        mut req: Request<Body>,
        opts: &ConnectOpts,
    ) -> Result<Response<Incoming>, SendError> {
        let sent = |source| SendError { error: Error::Request { addr: self.addr, source }, unsent: None };
        // A pooled connection can be closed by the server at any moment; hyper hands the request
        // back when it was not sent, and then a fresh connection takes it.
        if let Some((mut sender, requests)) = self.checkout_h1() {
            match sender.try_send_request(req).await {
                Ok(res) => {
                    self.checkin_h1(sender, requests + 1, opts);
                    return Ok(res);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(sent(e.into_error())),
                },
            }
        }
        let mut sender = match self.connect_h1(opts).await {
            Ok(s) => s,
            Err(error) => return Err(SendError { error, unsent: Some(req) }),
        };
        let res = sender.send_request(req).await.map_err(sent)?;
        self.checkin_h1(sender, 1, opts);
        Ok(res)
    }

    fn checkout_h1(&self) -> Option<(http1::SendRequest<Body>, u32)> {
        let now = Instant::now();
        let mut pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        // Walking every connection on every request cost thousands of instructions per request
        // once the pool held a few hundred (profile in BENCHMARKS.md): the newest ready
        // connection, which the scan from the end usually finds at once, lets older ones age
        // out, and `reap_idle` drops them off the request path.
        let i = pool.conns.iter().rposition(|c| c.sender.is_ready() && now < c.expires)?;
        let conn = pool.conns.swap_remove(i);
        Some((conn.sender, conn.requests))
    }

    /// Drops the pooled connections that are closed or were not used within their idle timeout,
    /// which closes them (an HTTP/2 connection once its streams end). Without this a burst's
    /// connections would stay open, and their buffers held, until the next request to this
    /// endpoint. Returns how many were dropped.
    pub fn reap_idle(&self, now: Instant) -> usize {
        let mut dropped = 0;
        {
            let mut pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
            let before = pool.conns.len();
            pool.conns.retain(|c| !c.sender.is_closed() && now < c.expires);
            dropped += before - pool.conns.len();
            if pool.conns.is_empty() {
                // The burst's capacity goes too.
                pool.conns = Vec::new();
            }
        }
        for slot in [&self.h2, &self.h1_over_h2] {
            let mut h2 = slot.conn.lock().unwrap_or_else(|e| e.into_inner());
            if h2.as_ref().is_some_and(|(s, _, expires)| s.is_closed() || *expires <= now) {
                *h2 = None;
                dropped += 1;
            }
        }
        dropped
    }

    /// Returns a connection with a request in flight; it is handed out again once the response
    /// body is done and hyper reports it ready. One that carried its last request is dropped
    /// instead, which closes it once that response is done.
    fn checkin_h1(&self, sender: http1::SendRequest<Body>, requests: u32, opts: &ConnectOpts) {
        let max = opts.max_requests_per_connection;
        if max > 0 && requests >= max {
            return;
        }
        let mut pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        if pool.conns.len() < MAX_H1_CONNS {
            pool.conns.push(H1Conn { sender, expires: Instant::now() + opts.idle_timeout, requests });
        }
    }

    async fn connect_h1(&self, opts: &ConnectOpts) -> Result<http1::SendRequest<Body>, Error> {
        let io = TokioIo::new(self.connect(opts, Tunnel::Http1).await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| Error::Handshake { addr: self.addr, source })?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%addr, %error, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// Whether this HTTP/1.1 request goes over the `weft/h2-http1` tunnel: the destination asks
    /// for it, the endpoint runs a proxy this one tunnels to, and the request does not take
    /// over its connection (an upgrade or CONNECT, which HTTP/2 cannot carry as HTTP/1.1 does).
    fn carries_http1_over_h2(&self, req: &Request<Body>, opts: &ConnectOpts) -> bool {
        opts.http1_over_h2
            && !self.no_http1_over_h2.load(Ordering::Relaxed)
            && self.is_tunneled(opts.mesh.as_deref())
            && req.method() != hyper::Method::CONNECT
            && !crate::http::headers::is_upgrade(req.headers())
    }

    async fn send_h2(
        &self,
        req: Request<Body>,
        opts: &ConnectOpts,
        tunnel: Tunnel,
    ) -> Result<Response<Incoming>, SendError> {
        let slot = if tunnel == Tunnel::Http1OverH2 { &self.h1_over_h2 } else { &self.h2 };
        let max = opts.max_requests_per_connection;
        // The cached connection, counting this request, unless it is closed or used up (then a
        // new one replaces it; the old one finishes its streams and closes).
        let cached = || {
            let mut h2 = slot.conn.lock().unwrap_or_else(|e| e.into_inner());
            match h2.as_mut() {
                Some((s, n, expires)) if !s.is_closed() && (max == 0 || *n < max) => {
                    *n += 1;
                    *expires = Instant::now() + opts.idle_timeout;
                    Some(s.clone())
                }
                _ => None,
            }
        };
        let mut sender = match cached() {
            Some(s) => s,
            None => {
                // One connect at a time; requests that waited reuse its connection.
                let _connecting = slot.connecting.lock().await;
                match cached() {
                    Some(s) => s,
                    None => match self.connect_h2(opts, tunnel).await {
                        Ok(s) => {
                            let expires = Instant::now() + opts.idle_timeout;
                            *slot.conn.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some((s.clone(), 1, expires));
                            s
                        }
                        Err(error) => return Err(SendError { error, unsent: Some(req) }),
                    },
                }
            }
        };
        let error = |source| Error::Request { addr: self.addr, source };
        if let Err(source) = sender.ready().await {
            return Err(SendError { error: error(source), unsent: Some(req) });
        }
        sender.send_request(req).await.map_err(|source| SendError { error: error(source), unsent: None })
    }

    async fn connect_h2(
        &self,
        opts: &ConnectOpts,
        tunnel: Tunnel,
    ) -> Result<http2::SendRequest<Body>, Error> {
        let io = self.connect(opts, tunnel).await?;
        // The offer of `weft/h2-http1` includes `weft/http1` for proxies that predate it; one
        // that chose it gets this endpoint's HTTP/1.1 requests over HTTP/1.1 from now on.
        if tunnel == Tunnel::Http1OverH2 && negotiated(&io) != Some(tunnel) {
            self.no_http1_over_h2.store(true, Ordering::Relaxed);
            tracing::debug!(addr = %self.addr, "the endpoint's proxy chose weft/http1 over weft/h2-http1");
            return Err(Error::NoHttp1OverH2 { addr: self.addr });
        }
        let io = TokioIo::new(io);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(opts.idle_timeout / 3))
            .keep_alive_while_idle(false)
            .handshake(io)
            .await
            .map_err(|source| Error::Handshake { addr: self.addr, source })?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }

    /// Refuses a meshed endpoint when this proxy should present a certificate and has none (not
    /// issued yet, or expired) — before a pooled connection, made while it had one, is reused.
    fn check_identity(&self, opts: &ConnectOpts) -> Result<(), Error> {
        match (&self.peer.identity, &opts.mesh, opts.require_mesh) {
            (Some(identity), None, true) => {
                Err(Error::NoIdentity { addr: self.addr, identity: SpiffeId::clone(identity) })
            }
            _ => Ok(()),
        }
    }

    /// Whether connections to this endpoint are mesh tunnels: it runs a proxy and this proxy
    /// has an identity to present. A proxy with an identity source but no certificate refuses
    /// meshed endpoints (`Error::NoIdentity`); only a proxy without any identity source (tests,
    /// benchmarks) reaches them in plain text.
    pub fn is_tunneled(&self, mesh: Option<&MeshTls>) -> bool {
        self.peer.identity.is_some() && mesh.is_some()
    }

    /// A connection carrying `tunnel` traffic: a mesh tunnel when `is_tunneled`, else plain TCP.
    pub async fn connect(&self, opts: &ConnectOpts, tunnel: Tunnel) -> Result<UpstreamIo, Error> {
        self.check_identity(opts)?;
        let tcp = self.connect_tcp(opts.connect_timeout).await?;
        let (Some(identity), Some(mesh)) = (&self.peer.identity, &opts.mesh) else {
            return Ok(Either::Left(tcp));
        };
        let timeout = opts.connect_timeout;
        let tls_err = |source| Error::Tls { addr: self.addr, identity: SpiffeId::clone(identity), source };
        let handshake = crate::tls::connect(tcp, identity, tunnel, mesh);
        match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(tls)) => Ok(Either::Right(Box::new(tls))),
            Ok(Err(source)) => Err(tls_err(source)),
            Err(_) => {
                Err(tls_err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")))
            }
        }
    }

    async fn connect_tcp(&self, timeout: Duration) -> Result<TcpStream, Error> {
        let addr = self.addr;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Error::ConnectTimeout { addr, timeout })?
            .map_err(|source| Error::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// The tunnel a mesh connection's server agreed to (ALPN); `None` for plain connections.
fn negotiated(io: &UpstreamIo) -> Option<Tunnel> {
    match io {
        Either::Left(_) => None,
        Either::Right(tls) => tls.get_ref().1.alpn_protocol().and_then(Tunnel::from_alpn),
    }
}
