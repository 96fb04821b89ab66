//! Serves one downstream HTTP connection with hyper: the limits and timeouts from `Settings`
//! (hyper's HTTP/1 header-read timeout needs a `Timer`, which is set here), an idle timeout, and
//! graceful shutdown on drain (HTTP/1 closes after the response in flight, HTTP/2 sends GOAWAY
//! and lets open streams finish).

use std::{future::Future, pin::Pin, sync::Arc};

use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceBuilder;

use tokio_util::sync::CancellationToken;

use super::{
    headers::RequestIdLayer,
    observe::{AccessLog, ConnMetrics, ObserveLayer},
    router::{ConnInfo, Router, Routing},
};
use crate::{
    io::{Activity, ActivityIo},
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

/// Serves HTTP on `io` until the client closes, the connection idles out, or drain completes.
pub async fn serve<I>(io: I, conn: ConnInfo, serving: Arc<Serving>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = TokioIo::new(ActivityIo::new(io, activity.clone()));
    let proto = conn.downstream;
    let peer = conn.conn.peer;
    let service = ServiceBuilder::new()
        .layer(RequestIdLayer)
        .layer(ObserveLayer {
            metrics: serving.routing.metrics.clone(),
            access_log: serving.access_log.clone(),
            direction: conn.conn.direction,
            activity: activity.clone(),
            conn: Arc::new(ConnMetrics::new(serving.local_peer(), conn.tunnel.clone())),
        })
        .service(Router::new(serving.routing.clone(), Arc::new(conn)));
    let service = TowerToHyperService::new(service);
    let limits = &serving.limits;
    let timeouts = &serving.timeouts;
    let result = match proto {
        Proto::Http1 => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                // hyper's head-read timeout also runs while a keep-alive connection waits for its
                // next request, closing idle connections early; `drive` enforces the deadline from
                // the first byte of a head instead. The Timer stays set for hyper's other timers.
                .header_read_timeout(None)
                .max_headers(limits.max_headers)
                .max_header_size(limits.max_header_bytes)
                .keep_alive(true)
                .serve_connection(io, service)
                .with_upgrades();
            drive(conn, |c| c.graceful_shutdown(), &serving, &activity, Some(timeouts.header_read)).await
        }
        Proto::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
                .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
                .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
                .serve_connection(io, service);
            drive(conn, |c| c.graceful_shutdown(), &serving, &activity, None).await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, ?proto, %error, "downstream connection ended with an error");
    }
}

/// Runs the connection until it ends. Closes it gracefully on drain and when idle (no request in
/// flight and no bytes for the idle timeout), and abruptly when a request head takes longer than
/// `head_timeout` from its first byte (slowloris).
async fn drive<C, F>(
    conn: C,
    shutdown: F,
    serving: &Serving,
    activity: &Activity,
    head_timeout: Option<std::time::Duration>,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
    F: Fn(Pin<&mut C>),
{
    let mut conn = std::pin::pin!(conn);
    let idle = serving.timeouts.http_idle;
    let mut closing = false;
    let head = async {
        match head_timeout {
            Some(limit) => activity.head_timeout(limit).await,
            None => std::future::pending().await,
        }
    };
    let mut head = std::pin::pin!(head);
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = serving.drain.cancelled(), if !closing => {
                closing = true;
                shutdown(conn.as_mut());
            }
            _ = activity.idle(idle, || activity.requests() > 0), if !closing => {
                tracing::debug!(?idle, "downstream HTTP connection idle; closing");
                closing = true;
                shutdown(conn.as_mut());
            }
            _ = head.as_mut() => {
                tracing::debug!(limit = ?head_timeout, "request head not received in time; closing");
                return Ok(());
            }
        }
    }
}
