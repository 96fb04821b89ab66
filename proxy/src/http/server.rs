//! Serves one downstream HTTP connection with hyper: the limits and timeouts from `Settings`
//! (hyper's HTTP/1 header-read timeout needs a `Timer`, which is set here; the request-line and
//! HTTP/2 header-count limits hyper lacks are `limits`'), an idle timeout, and graceful shutdown
//! on drain (HTTP/1 closes after the response in flight, HTTP/2 sends GOAWAY and lets open
//! streams finish). HTTP/2 frames that carry no request are budgeted below hyper
//! (`io::ActivityIo::guard_h2_control_frames`). Connections h2 or that budget ends for a flood
//! (GOAWAY ENHANCE_YOUR_CALM) are logged at most once per 10 s, with a count of the others.

use std::{future::Future, pin::Pin, sync::Arc, task::Poll, time::Duration};

use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::ServiceBuilder;

use tokio_util::sync::CancellationToken;

use super::{
    headers::{RequestId, RequestIdLayer},
    limits::{self, LimitsLayer, RequestLine},
    observe::{AccessLog, ConnMetrics, Observe, ObserveLayer},
    router::{ConnInfo, Router, Routing},
};
use crate::{
    io::{Activity, ActivityIo, Due, Park, PrefixedIo, Watch},
    log_limit::LogLimit,
    metrics::GaugeGuard,
    peer::Peer,
    settings::{Limits, Timeouts},
    upstream::Proto,
};

/// What serving HTTP connections takes, handed over once by `app`.
#[derive(Debug)]
pub struct Serving {
    pub routing: Arc<Routing>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub access_log: Option<AccessLog>,
    /// Cancelled when draining starts: connections close gracefully.
    pub drain: CancellationToken,
    /// This proxy's workload and namespace, for metric labels.
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    /// The log lines for HTTP/2 connections h2 ended for a flood.
    pub flood_log: LogLimit,
}

impl Serving {
    /// `flood_log`'s: at most one line per `FLOOD_LOG_PERIOD`.
    pub fn new_flood_log() -> LogLimit {
        LogLimit::new(FLOOD_LOG_PERIOD)
    }
}

/// Whether h2 ended the connection for a flood of some kind: rapid reset, too many streams it
/// had to reset, CONTINUATION floods (its GOAWAY says ENHANCE_YOUR_CALM; the debug data naming
/// the kind stays inside h2). h2 also logs a warning of its own for some of them, silenced by
/// `log_limit::filter`.
fn is_flood(error: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_library() && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        cause = e.source();
    }
    false
}

impl Serving {
    /// This proxy's side of a connection, for metric labels.
    pub fn local_peer(&self) -> Peer {
        let workload = self.workload.clone();
        match self.routing.destinations.identity.current() {
            Some(tls) => Peer { workload, ..tls.peer.clone() },
            None => Peer { namespace: self.namespace.clone(), workload, ..Peer::default() },
        }
    }
}

/// A downstream connection's request path, as hyper calls it.
type ConnService = TowerToHyperService<RequestId<Observe<limits::Limits<Router>>>>;

/// Serves HTTP on `io` until the client closes, the connection idles out, or drain completes.
pub async fn serve<I>(io: I, conn: Arc<ConnInfo>, serving: Arc<Serving>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let proto = conn.downstream;
    let peer = conn.conn.peer;
    let limits = &serving.limits;
    let io = match proto {
        Proto::Http1 => ActivityIo::new(io, activity.clone())
            .limit_request_line(RequestLine::new(limits.max_uri_bytes, limits.max_header_bytes)),
        Proto::Http2 => ActivityIo::new(io, activity.clone()).guard_h2_control_frames(),
    };
    let conn_metrics = Arc::new(ConnMetrics::new(serving.local_peer(), conn.tunnel.clone()));
    let service = ServiceBuilder::new()
        .layer(RequestIdLayer)
        .layer(ObserveLayer {
            metrics: serving.routing.metrics.clone(),
            access_log: serving.access_log.clone(),
            direction: conn.conn.direction,
            activity: activity.clone(),
            conn: conn_metrics.clone(),
        })
        .layer(LimitsLayer { max_uri_bytes: limits.max_uri_bytes, max_headers: limits.max_headers })
        .service(Router::new(serving.routing.clone(), conn));
    let service = TowerToHyperService::new(service);
    let result = match proto {
        Proto::Http1 => serve_http1(io, service, &serving, &activity, &conn_metrics).await,
        // Boxed: h2's state would otherwise size every connection's task, parked HTTP/1 ones
        // included.
        Proto::Http2 => Box::pin(serve_http2(io, service, &serving, &activity)).await,
    };
    // The control-frame budget ends a connection with an EOF or a failed write, which hyper may
    // report as a clean end or as an I/O error: the flag says which it was.
    let flood = match (activity.h2_flooded(), &result) {
        (true, _) => Some("control frames"),
        (false, Err(error)) if is_flood(error) => Some("streams"),
        (false, Err(error)) => {
            tracing::debug!(%peer, ?proto, %error, "downstream connection ended with an error");
            None
        }
        (false, Ok(())) => None,
    };
    let Some(flood) = flood else { return };
    if let Some(suppressed) = serving.flood_log.check(tokio::time::Instant::now()) {
        tracing::warn!(
            %peer,
            flood,
            suppressed,
            "closed an HTTP/2 connection that flooded the proxy (GOAWAY ENHANCE_YOUR_CALM); one line \
             per 10 s at most, `suppressed` counts the connections left out since the last one"
        );
    } else {
        tracing::debug!(%peer, flood, "closed an HTTP/2 connection that flooded the proxy (GOAWAY ENHANCE_YOUR_CALM)");
    }
}

/// At most one line per this long for HTTP/2 floods.
const FLOOD_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Serves HTTP/1 requests on `io` with hyper, parking the connection between requests: once a
/// keep-alive connection has been idle for `Timeouts::http1_park`, hyper lets go of it (its
/// 8 KiB read and write buffers and its connection state are freed) and only the socket waits
/// for the next bytes, which bring up a new hyper connection that reads them first. An idle
/// connection then holds about 3 KB of heap instead of about 25 KB. A new connection waits the
/// same way for its first bytes.
async fn serve_http1<I>(
    io: ActivityIo<I>,
    mut service: ConnService,
    serving: &Serving,
    activity: &Activity,
    conn_metrics: &ConnMetrics,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = TokioIo::new(PrefixedIo::new(bytes::Bytes::new(), io));
    loop {
        if !io.inner().has_prefix() {
            let woke = {
                let _parked = GaugeGuard::inc(serving.routing.metrics.connections_parked.clone());
                wait_for_bytes(io.inner_mut(), serving, activity).await
            };
            match woke {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(error) => {
                    tracing::debug!(%error, "downstream HTTP/1 connection failed while idle");
                    return Ok(());
                }
            }
        }
        // Boxed: hyper's connection and its driver exist only while the connection is active.
        let Some(parts) = Box::pin(serve_until_parked(io, service, serving, activity)).await? else {
            return Ok(());
        };
        serving.routing.metrics.http1_parks.inc();
        conn_metrics.forget_recent();
        // Keep the socket and what hyper had read past the last request (the start of the next
        // head, if any).
        io = parts.io;
        service = parts.service;
        io.inner_mut().unread(parts.read_buf);
    }
}

/// Serves HTTP/1 requests with one hyper connection until the connection ends (`None`) or,
/// once idle for `Timeouts::http1_park`, hyper lets go of it without closing it.
async fn serve_until_parked<I>(
    io: TokioIo<PrefixedIo<ActivityIo<I>>>,
    service: ConnService,
    serving: &Serving,
    activity: &Activity,
) -> Result<Option<http1::Parts<TokioIo<PrefixedIo<ActivityIo<I>>>, ConnService>>, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let quiet = serving.timeouts.http1_park;
    let watch = Watch {
        idle: Some(serving.timeouts.http_idle),
        head: Some(serving.timeouts.header_read),
        park: (!quiet.is_zero()).then(|| Park { quiet, served_before: activity.served() }),
    };
    let limits = &serving.limits;
    // Made for each wake-up rather than kept: a parked connection holds nothing hyper needs.
    let mut conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // hyper's head-read timeout also runs while a keep-alive connection waits for its next
        // request, closing idle connections early; `drive` enforces the deadline from the first
        // byte of a head instead. The Timer stays set for hyper's other timers.
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true)
        .serve_connection(io, service)
        .with_upgrades();
    drive(Pin::new(&mut conn), |c| c.graceful_shutdown(), serving, activity, watch).await?;
    Ok(if activity.take_parked() { conn.into_parts() } else { None })
}

/// Serves HTTP/2 streams on `io` until the connection ends.
async fn serve_http2<I>(
    io: ActivityIo<I>,
    service: ConnService,
    serving: &Serving,
    activity: &Activity,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &serving.limits;
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .serve_connection(TokioIo::new(io), service);
    let conn = std::pin::pin!(conn);
    drive(conn, |c| c.graceful_shutdown(), serving, activity, Watch::idle(serving.timeouts.http_idle)).await
}

/// Waits, without buffers, until a parked HTTP/1 connection has bytes to read, and reads them
/// into its prefix (through `ActivityIo`, which counts them and watches the request line).
/// False when the connection ended meanwhile: the client closed it, it idled out, or drain.
async fn wait_for_bytes<I>(
    io: &mut PrefixedIo<ActivityIo<I>>,
    serving: &Serving,
    activity: &Activity,
) -> std::io::Result<bool>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let read = std::future::poll_fn(|cx| {
        // On the stack only while polled: a parked connection holds no buffer.
        let mut buf = [0u8; 2048];
        let mut filled = ReadBuf::new(&mut buf);
        std::task::ready!(Pin::new(io.get_mut()).poll_read(cx, &mut filled))?;
        Poll::Ready(Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(filled.filled())))
    });
    let bytes = tokio::select! {
        read = read => read?,
        _ = serving.drain.cancelled() => return Ok(false),
        _ = activity.due(Watch::idle(serving.timeouts.http_idle)) => {
            tracing::debug!(idle = ?serving.timeouts.http_idle, "downstream HTTP connection idle; closing");
            return Ok(false);
        }
    };
    if bytes.is_empty() {
        return Ok(false);
    }
    io.unread(bytes);
    Ok(true)
}

/// Runs the connection until it ends. Closes it gracefully on drain and when idle (no request in
/// flight and no bytes for the idle timeout), abruptly when a request head takes longer than its
/// timeout from its first byte (slowloris; HTTP/1 only), and, when `watch` parks (HTTP/1), asks
/// hyper to let go of the connection without closing it once it is idle between requests.
async fn drive<C, F>(
    mut conn: Pin<&mut C>,
    shutdown: F,
    serving: &Serving,
    activity: &Activity,
    watch: Watch,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
    F: Fn(Pin<&mut C>),
{
    // Once closing, only the head deadline is still watched.
    let closing = Watch { head: watch.head, ..Watch::default() };
    let mut watching = watch;
    loop {
        let open = watching.idle.is_some();
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = serving.drain.cancelled(), if open => {
                watching = closing;
                shutdown(conn.as_mut());
            }
            due = activity.due(watching) => match due {
                Due::Idle => {
                    tracing::debug!(idle = ?watch.idle, "downstream HTTP connection idle; closing");
                    watching = closing;
                    shutdown(conn.as_mut());
                }
                Due::Head => {
                    tracing::debug!(limit = ?watch.head, "request head not received in time; closing");
                    return Ok(());
                }
                Due::Park => {
                    watching = closing;
                    activity.request_park();
                    shutdown(conn.as_mut());
                }
            }
        }
    }
}
