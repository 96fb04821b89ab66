//! The admin server (default `:15000`): `/live`, `/ready`, `/config`, `/metrics`, and
//! `POST /shutdown` from loopback only (an SSRF-reachable shutdown is a denial of service, so it
//! refuses every other peer).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    app::Shared,
    http::{Body, full},
};

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    done: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = done.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let res = handle(&req, peer, &shared, &shutdown);
                async move { Ok::<_, Infallible>(res) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(error) = conn.await {
                tracing::debug!(%error, "admin connection error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

fn handle<B>(
    req: &Request<B>,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if shared.drain.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if shared.is_ready() {
                match shared.identity.current() {
                    Some(tls) => {
                        let expiry = tls.expiry_unix();
                        let roots = tls.bundle.roots.len();
                        let body = format!(
                            "ready\nidentity: {}\nnotAfterUnixSeconds: {expiry}\ntrustBundleRoots: {roots}\n",
                            tls.creds.id
                        );
                        text(StatusCode::OK, body)
                    }
                    None => text(StatusCode::OK, "ready\n"),
                }
            } else if shared.store.is_ready() {
                text(StatusCode::SERVICE_UNAVAILABLE, "no identity loaded\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no config loaded\n")
            }
        }
        (&Method::GET, "/config") => {
            let status = shared.store.status();
            let snapshot = shared.store.current();
            let body = serde_json::json!({
                "version": snapshot.as_ref().map(|s| s.version.clone()),
                "loadedAtUnixSeconds": status.loaded_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                "loadAttempts": status.attempts,
                "lastError": status.last_error,
                "config": snapshot.as_ref().map(|s| &s.source),
            });
            let mut res = text(StatusCode::OK, format!("{body:#}\n"));
            res.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            res
        }
        (&Method::GET, "/metrics") => {
            let mut res = text(StatusCode::OK, shared.metrics.encode());
            res.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            res
        }
        (&Method::POST, "/shutdown") if peer.ip().is_loopback() => {
            tracing::info!(%peer, "shutdown requested on the admin port");
            shutdown.cancel();
            text(StatusCode::OK, "draining\n")
        }
        (&Method::POST, "/shutdown") => {
            tracing::warn!(%peer, "refused shutdown from a non-loopback peer");
            text(StatusCode::FORBIDDEN, "shutdown is accepted from loopback only\n")
        }
        (_, "/live" | "/ready" | "/config" | "/metrics" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::{app::Passthrough, config::Store, metrics::Metrics, settings::Settings};

    #[tokio::test]
    async fn shutdown_is_refused_from_non_loopback_peers() {
        let shared = Shared {
            settings: Settings::loopback("unused".into()),
            store: Store::default(),
            metrics: Metrics::new(),
            access_log: None,
            passthrough: Passthrough::default(),
            control_plane: None,
            identity: Default::default(),
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
            mirrors: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let shutdown = CancellationToken::new();
        let post = Request::post("/shutdown").body(()).unwrap();
        let remote: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        assert_eq!(handle(&post, remote, &shared, &shutdown).status(), StatusCode::FORBIDDEN);
        assert!(!shutdown.is_cancelled());
        let v6_remote: SocketAddr = "[fd00::1]:5555".parse().unwrap();
        assert_eq!(handle(&post, v6_remote, &shared, &shutdown).status(), StatusCode::FORBIDDEN);
        let local: SocketAddr = "[::1]:5555".parse().unwrap();
        assert_eq!(handle(&post, local, &shared, &shutdown).status(), StatusCode::OK);
        assert!(shutdown.is_cancelled());
    }
}
