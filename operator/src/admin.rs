//! The admin server: `/live` (the process runs), `/ready` (config is being served: every kind
//! has listed once), `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{controllers::Snapshot, metrics::Metrics};

#[derive(Clone, Debug)]
struct AdminState {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
}

pub fn router(snapshots: watch::Receiver<Option<Arc<Snapshot>>>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { snapshots, metrics })
}

async fn ready(State(state): State<AdminState>) -> Response {
    if state.snapshots.borrow().is_some() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n").into_response()
    }
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.encode()).into_response()
}

pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await
}
