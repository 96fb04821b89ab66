//! The HTTPS server: `/mutate` (AdmissionReview), `/healthz`, `/metrics`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use weft_inject::InjectConfig;

use crate::{admission, metrics::Metrics, tls::CertStore};

/// Kubernetes objects are at most ~1.5 MB; an AdmissionReview for CREATE carries one.
const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, requests in flight get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct AppState {
    pub config: InjectConfig,
    pub metrics: Metrics,
}

impl AppState {
    pub fn new(config: InjectConfig) -> Arc<Self> {
        Arc::new(Self { config, metrics: Metrics::default() })
    }
}

/// The webhook's routes, without TLS: tests drive it with `oneshot`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(state)
}

async fn mutate(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    match admission::review(&body, &state.config) {
        Ok((review, outcome)) => {
            state.metrics.record(outcome, started.elapsed().as_secs_f64());
            let uid = review.response.as_ref().map(|r| r.uid.as_str()).unwrap_or_default();
            debug!(
                uid,
                outcome = outcome.as_str(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "admission"
            );
            Json(review).into_response()
        }
        Err(error) => {
            state.metrics.record_malformed();
            warn!(%error, "rejected a request to /mutate");
            (StatusCode::BAD_REQUEST, error.to_string()).into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.encode()).into_response()
}

/// Serves `router` over TLS with the certificates in `certs` until `shutdown` turns true; then
/// stops accepting, lets requests in flight finish (up to [`DRAIN_TIMEOUT`]) and closes every
/// connection, keep-alive ones included.
pub async fn serve_tls(
    listener: TcpListener,
    certs: Arc<CertStore>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(certs.server_config()));
    let service = TowerToHyperService::new(router);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (acceptor, service, watcher) = (acceptor.clone(), service.clone(), graceful.watcher());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => return debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service).into_owned();
            if let Err(error) = watcher.watch(connection).await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    info!(connections = graceful.count(), "stopped accepting; draining");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// Checks the certificate files every `interval` and installs a changed pair; a bad pair is
/// logged and the old one keeps serving.
pub async fn watch_certs(certs: Arc<CertStore>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match certs.reload_if_changed() {
            Ok(true) => info!("installed a renewed serving certificate"),
            Ok(false) => {}
            Err(error) => warn!(%error, "kept the current serving certificate"),
        }
    }
}
