//! The webhook's HTTP routes, driven in-process with `oneshot` (no TLS, no cluster).

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use weft_inject::InjectConfig;
use weft_webhook::server::{AppState, router};

fn app() -> (Router, Arc<AppState>) {
    let state = AppState::new(InjectConfig::default());
    (router(state.clone()), state)
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "annotations": annotations},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
    })
}

fn review(kind: &str, object: Value, dry_run: bool) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0c4a5f8e-6c1e-4d3b-9f59-1f1a0f3d2b77",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": dry_run
        }
    })
}

async fn call(app: &Router, method: &str, uri: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

async fn mutate(app: &Router, review: &Value) -> Value {
    let (status, body) = call(app, "POST", "/mutate", serde_json::to_vec(review).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    answer["response"].clone()
}

fn patch_of(response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    // The patch is JSON bytes: kube encodes them as an array of numbers, which the apiserver
    // decodes into its `[]byte` (the apiserver tests in e2e/ prove it).
    let bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).expect("patch bytes");
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_pod_create_is_answered_with_an_injecting_patch() {
    let (app, _) = app();
    let response = mutate(&app, &review("Pod", pod(json!({})), false)).await;
    assert_eq!(response["uid"], "0c4a5f8e-6c1e-4d3b-9f59-1f1a0f3d2b77");
    assert_eq!(response["allowed"], true);
    let mut object = pod(json!({}));
    let patch: json_patch::Patch = serde_json::from_value(patch_of(&response)).unwrap();
    json_patch::patch(&mut object, &patch).unwrap();
    let inits: Vec<&str> = object["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(inits, ["weft-init", "weft-proxy"]);
    assert!(object["metadata"]["annotations"]["weft.dev/injected"].is_string());
    assert!(
        object["metadata"].get("namespace").is_none(),
        "the patch does not add the namespace it was told"
    );
}

#[tokio::test]
async fn dry_run_gets_the_same_answer() {
    let (app, _) = app();
    let real = mutate(&app, &review("Pod", pod(json!({})), false)).await;
    let dry = mutate(&app, &review("Pod", pod(json!({})), true)).await;
    assert_eq!(real, dry);
}

#[tokio::test]
async fn opted_out_and_other_kinds_are_allowed_untouched() {
    let (app, _) = app();
    let opted_out = mutate(&app, &review("Pod", pod(json!({"weft.dev/inject": "false"})), false)).await;
    assert_eq!((opted_out["allowed"].as_bool(), opted_out.get("patch")), (Some(true), None));
    let service = mutate(
        &app,
        &review("Service", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}), false),
    )
    .await;
    assert_eq!((service["allowed"].as_bool(), service.get("patch")), (Some(true), None));
}

#[tokio::test]
async fn a_bad_annotation_denies_the_pod_naming_it() {
    let (app, _) = app();
    let response =
        mutate(&app, &review("Pod", pod(json!({"weft.dev/exclude-inbound-ports": "http"})), false)).await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("weft.dev/exclude-inbound-ports"), "{message}");
}

#[tokio::test]
async fn a_malformed_pod_is_denied_with_a_reason() {
    let (app, _) = app();
    let mut broken = pod(json!({}));
    broken["spec"]["containers"] = json!("not a list");
    let response = mutate(&app, &review("Pod", broken, false)).await;
    assert_eq!(response["allowed"], false);
    assert!(response["status"]["message"].as_str().unwrap().contains("not a valid Pod"));
}

#[tokio::test]
async fn malformed_reviews_get_a_400_and_are_counted() {
    let (app, state) = app();
    for body in [
        b"{not json".to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        Vec::new(),
    ] {
        let (status, message) = call(&app, "POST", "/mutate", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8(message).unwrap().starts_with("malformed AdmissionReview"));
    }
    assert!(state.metrics.encode().contains("weft_webhook_malformed_reviews_total 3"));
}

#[tokio::test]
async fn health_and_metrics_are_served() {
    let (app, _) = app();
    mutate(&app, &review("Pod", pod(json!({})), false)).await;
    mutate(&app, &review("Pod", pod(json!({"weft.dev/inject": "false"})), false)).await;
    assert_eq!(call(&app, "GET", "/healthz", Vec::new()).await, (StatusCode::OK, b"ok".to_vec()));
    let (status, body) = call(&app, "GET", "/metrics", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains(r#"weft_webhook_admissions_total{outcome="injected",reason=""} 1"#), "{text}");
    assert!(
        text.contains(r#"weft_webhook_admissions_total{outcome="skipped",reason="opted_out"} 1"#),
        "{text}"
    );
    assert!(text.contains("weft_webhook_admission_duration_seconds_count 2"), "{text}");
}
