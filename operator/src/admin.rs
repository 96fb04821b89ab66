//! The admin server: `/live` (the process runs), `/ready` (config is being served: every kind
//! has listed once, and the gRPC port serves a certificate from the CA), `/metrics`
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

use crate::{ca::serving::ServingTls, controllers::Snapshot, metrics::Metrics};

#[derive(Clone, Debug)]
struct AdminState {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    serving: Arc<ServingTls>,
    metrics: Arc<Metrics>,
}

pub fn router(
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    serving: Arc<ServingTls>,
    metrics: Arc<Metrics>,
) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { snapshots, serving, metrics })
}

async fn ready(State(state): State<AdminState>) -> Response {
    if state.snapshots.borrow().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n").into_response()
    } else if state.serving.current().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "no certificate from the CA on the gRPC port yet\n").into_response()
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
        let serving = Arc::new(ServingTls::default());
        let app = router(snapshots, serving.clone(), metrics.clone());
        assert_eq!(get(app.clone(), "/live").await.0, StatusCode::OK);
        assert_eq!(get(app.clone(), "/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
        publish.send_replace(Some(Arc::new(Snapshot {
            generation: 1,
            resolution: Default::default(),
            cluster_domain: "cluster.local".into(),
            changed_at: tokio::time::Instant::now(),
        })));
        let (status, body) = get(app.clone(), "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("no certificate"), "{body}");
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let ca = weft_identity::ca::Issuer::new_root("cluster.local", now, day).unwrap();
        let id = weft_identity::SpiffeId::new("cluster.local", "mesh", "weft-operator").unwrap();
        let issued = ca.issue_with_dns(&id, &["weft-operator.mesh.svc".to_owned()], now, day).unwrap();
        let creds =
            weft_identity::Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
                .unwrap();
        let bundle = weft_identity::TrustBundle::from_pem(ca.root_pem().as_bytes()).unwrap();
        serving.set(weft_identity::tls::control_server_config(&creds, &bundle).unwrap());
        assert_eq!(get(app.clone(), "/ready").await.0, StatusCode::OK);
        metrics.record_error("watch");
        let (status, text) = get(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("weft_operator_errors_total{reason=\"watch\"} 1"), "{text}");
    }
}
