//! The admin server: readiness follows the config, /config and /metrics, /shutdown.

use http::{Method, StatusCode};

use crate::support::*;

#[tokio::test]
async fn ready_only_once_a_config_is_loaded() {
    let proxy = TestProxy::start("services: [{name: a, ports: [{number: 0}]}]").await;
    assert_eq!(admin(&proxy, Method::GET, "/live").await.status, StatusCode::OK);
    let ready = admin(&proxy, Method::GET, "/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let config = admin(&proxy, Method::GET, "/config").await.json();
    assert!(config["version"].is_null());
    assert!(config["lastError"].as_str().unwrap().contains("port must be 1-65535"));

    // Requests before any config are refused, not hung.
    let r = H1::connect(proxy.addr()).await.get("a", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);

    proxy.write_config("version: good\nservices: [{name: a, ports: [{number: 80}]}]").await.unwrap();
    assert_eq!(admin(&proxy, Method::GET, "/ready").await.status, StatusCode::OK);
    let config = admin(&proxy, Method::GET, "/config").await;
    assert_eq!(config.headers["content-type"], "application/json");
    let config = config.json();
    assert_eq!(config["version"], "good");
    assert_eq!(config["config"]["services"][0]["name"], "a");
    assert_eq!(config["config"]["services"][0]["ports"][0]["number"], 80);
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_bounded_labels() {
    let up = backend("up").await;
    let proxy = TestProxy::start(&format!(
        "services: [{{name: svc, ports: [{{number: 80, endpoints: [{{address: \"{}\"}}]}}]}}]",
        up.addr
    ))
    .await;
    let mut c = H1::connect(proxy.addr()).await;
    for i in 0..3 {
        // Distinct paths and hosts never become labels.
        assert_eq!(c.get("svc", &format!("/p{i}")).await.status, StatusCode::OK);
    }
    c.get("unknown-host", "/").await;
    let m = admin(&proxy, Method::GET, "/metrics").await;
    assert!(m.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = String::from_utf8_lossy(&m.body);
    let ok = r#"weft_requests_total{direction="explicit",source_workload="",source_namespace="",source_principal="",destination_workload="",destination_namespace="",destination_principal="",destination_service="svc",response_code="200",grpc_status="",tls="false",response_flags=""} 3"#;
    assert!(text.contains(ok), "{text}");
    assert!(text.contains(r#"destination_service="unknown",response_code="404""#), "{text}");
    assert!(text.contains("weft_request_duration_seconds_bucket{le=\"0.0005\""), "{text}");
    assert!(text.contains(r#"weft_config_reloads_total{result="ok"} 1"#), "{text}");
    assert!(!text.contains("/p1"), "no paths in labels");
}

#[tokio::test]
async fn shutdown_is_post_only_and_starts_draining() {
    let proxy = TestProxy::start("services: []").await;
    assert_eq!(admin(&proxy, Method::GET, "/shutdown").await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(admin(&proxy, Method::GET, "/nope").await.status, StatusCode::NOT_FOUND);
    assert!(!proxy.handle.is_draining());
    assert_eq!(admin(&proxy, Method::POST, "/shutdown").await.status, StatusCode::OK);
    within("drain", proxy.handle.wait()).await;
    assert!(proxy.handle.is_draining());
}
