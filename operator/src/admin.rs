//! The admin server: `/live` (the process runs), `/ready` (config is being served: every kind
//! has listed once, and the CA is loaded, so the gRPC port has its certificate), `/metrics`
//! (Prometheus text).

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

use crate::{ca::Authority, controllers::Snapshot, metrics::Metrics};

#[derive(Clone, Debug)]
struct AdminState {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
}

pub fn router(
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { snapshots, authority, metrics })
}

async fn ready(State(state): State<AdminState>) -> Response {
    if state.snapshots.borrow().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n").into_response()
    } else if state.authority.current().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "the CA is not loaded yet\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.encode()).into_response()
}

pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let res = router.oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn ready_only_once_a_snapshot_is_served_and_the_ca_loaded_and_metrics_are_text() {
        let (publish, snapshots) = watch::channel(None);
        let metrics = Arc::new(Metrics::default());
        let authority = Arc::new(Authority::default());
        let app = router(snapshots, authority.clone(), metrics.clone());
        assert_eq!(get(app.clone(), "/live").await.0, StatusCode::OK);
        assert_eq!(get(app.clone(), "/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
        publish.send_replace(Some(Arc::new(Snapshot {
            generation: 1,
            resolution: Default::default(),
            cluster_domain: "cluster.local".into(),
            changed_at: tokio::time::Instant::now(),
        })));
        assert_eq!(
            get(app.clone(), "/ready").await,
            (StatusCode::SERVICE_UNAVAILABLE, "the CA is not loaded yet\n".into())
        );
        let config = crate::ca::CaConfig::new("mesh", "cluster.local");
        let secret = crate::ca::authority::new_root_secret(&config, std::time::SystemTime::now()).unwrap();
        authority.set(crate::ca::authority::signer_from("weft-ca", &secret.data.unwrap(), "1").unwrap());
        assert_eq!(get(app.clone(), "/ready").await.0, StatusCode::OK);
        metrics.record_error("watch");
        let (status, text) = get(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("weft_operator_errors_total{reason=\"watch\"} 1"), "{text}");
    }
}
