//! The demo app in-process on 127.0.0.1, driven by real HTTP/1.1, HTTP/2 and gRPC clients.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode, Version, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{Code, transport::Channel};
use weft_demo::{
    Config, Identity,
    grpc::proto::{
        demo::{InfoRequest, demo_client::DemoClient},
        health::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient},
    },
};

/// Starts the app on an ephemeral port; it is accepting once this returns (the listener is bound).
async fn start(config: Config) -> SocketAddr {
    start_until(config, std::future::pending()).await.0
}

async fn start_until(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (address, tokio::spawn(weft_demo::serve(listener, config, shutdown)))
}

fn identity(service: &str, version: &str) -> Identity {
    Identity {
        service: service.into(),
        version: version.into(),
        pod: format!("{service}-{version}-7d4b9"),
        namespace: "shop".into(),
    }
}

fn config(service: &str, version: &str) -> Config {
    Config { identity: identity(service, version), ..Config::default() }
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `GET http://{address}{path}` over HTTP/1.1: status and body.
async fn get(address: SocketAddr, path: &str) -> (StatusCode, String) {
    get_with(&client(), address, path).await
}

async fn get_with(
    client: &Client<HttpConnector, Empty<Bytes>>,
    address: SocketAddr,
    path: &str,
) -> (StatusCode, String) {
    let response = client.get(format!("http://{address}{path}").parse().unwrap()).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn get_json(address: SocketAddr, path: &str) -> (StatusCode, Value) {
    let (status, body) = get(address, path).await;
    (status, serde_json::from_str(&body).unwrap_or_else(|error| panic!("{path}: {error}: {body}")))
}

fn identity_json(identity: &Identity) -> Value {
    serde_json::to_value(identity).unwrap()
}

#[tokio::test]
async fn root_answers_identity_from_config() {
    let config = config("reviews", "v2");
    let address = start(config.clone()).await;
    let response = client().get(format!("http://{address}/").parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        body,
        json!({"service": "reviews", "version": "v2", "pod": "reviews-v2-7d4b9", "namespace": "shop"})
    );
}

#[tokio::test]
async fn root_answers_empty_strings_when_identity_unset() {
    let address = start(Config::default()).await;
    let (status, body) = get_json(address, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"service": "", "version": "", "pod": "", "namespace": ""}));
}

#[tokio::test]
async fn status_parameter_sets_the_status_and_keeps_the_body() {
    let config = config("ratings", "v1");
    let address = start(config.clone()).await;
    for status in [201, 404, 503, 599] {
        let (answered, body) = get_json(address, &format!("/?status={status}")).await;
        assert_eq!(answered.as_u16(), status);
        assert_eq!(body, identity_json(&config.identity));
    }
}

#[tokio::test]
async fn delay_parameter_waits_before_answering() {
    let address = start(config("ratings", "v1")).await;
    let started = Instant::now();
    let (status, _) = get_json(address, "/?delay_ms=300&status=202").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
}

#[tokio::test]
async fn bad_parameters_answer_400_naming_the_parameter() {
    let address = start(config("ratings", "v1")).await;
    for (path, parameter) in [
        ("/?status=abc", "status="),
        ("/?status=700", "status="),
        ("/?status=100", "status="),
        ("/?delay_ms=60001", "delay_ms="),
        ("/?delay_ms=-5", "delay_ms="),
        ("/?status=%zz", "percent-encoding"),
        ("/call", "missing url"),
        ("/call?url=https://example.test/", "url="),
        ("/call?url=http://127.0.0.1:1/&n=0", "n="),
        ("/call?url=http://127.0.0.1:1/&n=100001", "n="),
        ("/call?url=http://127.0.0.1:1/&concurrency=257", "concurrency="),
        ("/call?url=http://127.0.0.1:1/&header=no-colon", "header="),
        ("/call?url=http://127.0.0.1:1/&h2=maybe", "h2="),
    ] {
        let (status, body) = get(address, path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.contains(parameter), "{path}: {body}");
    }
}

#[tokio::test]
async fn fail_percent_100_always_fails() {
    let config = Config {
        fail_percent: 100,
        fail_status: StatusCode::INTERNAL_SERVER_ERROR,
        ..config("reviews", "v3")
    };
    let address = start(config.clone()).await;
    let client = client();
    for _ in 0..100 {
        let (status, body) = get_with(&client, address, "/").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), identity_json(&config.identity));
    }
    // Only `GET /` fails; probes keep passing.
    assert_eq!(get(address, "/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn fail_percent_0_never_fails() {
    let address = start(Config { fail_percent: 0, ..config("reviews", "v1") }).await;
    let client = client();
    for _ in 0..300 {
        assert_eq!(get_with(&client, address, "/").await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn healthz_answers_ok() {
    let address = start(Config::default()).await;
    assert_eq!(get(address, "/healthz").await, (StatusCode::OK, "ok\n".to_string()));
    assert_eq!(get(address, "/nope").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_counts_statuses_and_versions() {
    let caller = start(config("frontend", "v1")).await;
    let v2 = start(config("reviews", "v2")).await;
    let failing_v3 = start(Config {
        fail_percent: 100,
        fail_status: StatusCode::INTERNAL_SERVER_ERROR,
        ..config("reviews", "v3")
    })
    .await;

    let (status, report) = get_json(caller, &format!("/call?url=http://{v2}/&n=40&concurrency=4")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["status"], json!({"200": 40}));
    assert_eq!(report["versions"], json!({"v2": 40}));
    assert_eq!(report["errors"], 0);
    let latency = &report["latency_ms"];
    let (p50, p90, p99) = (
        latency["p50"].as_f64().unwrap(),
        latency["p90"].as_f64().unwrap(),
        latency["p99"].as_f64().unwrap(),
    );
    assert!(0.0 <= p50 && p50 <= p90 && p90 <= p99, "{latency}");

    // The target's own query travels percent-encoded.
    let (_, report) = get_json(caller, &format!("/call?url=http%3A%2F%2F{v2}%2F%3Fstatus%3D503&n=5")).await;
    assert_eq!(report["status"], json!({"503": 5}));
    assert_eq!(report["versions"], json!({"v2": 5}));

    let (_, report) = get_json(caller, &format!("/call?url=http://{failing_v3}/&n=10&concurrency=3")).await;
    assert_eq!(report["status"], json!({"500": 10}));
    assert_eq!(report["versions"], json!({"v3": 10}));
    assert_eq!(report["errors"], 0);

    // Answers without a `version` field count by status only.
    let (_, report) =
        get_json(caller, &format!("/call?url=http://{v2}/healthz&n=3&header=x-user:jason")).await;
    assert_eq!(report["status"], json!({"200": 3}));
    assert_eq!(report["versions"], json!({}));
}

#[tokio::test]
async fn call_counts_a_refused_connection_as_an_error() {
    let caller = start(config("frontend", "v1")).await;
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let (status, report) = get_json(caller, &format!("/call?url=http://{closed}/&n=3&concurrency=2")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        report,
        json!({
            "status": {},
            "versions": {},
            "errors": 3,
            "latency_ms": {"p50": null, "p90": null, "p99": null},
            "slow": null,
        })
    );
}

#[tokio::test]
async fn call_with_h2_uses_http2_prior_knowledge() {
    let caller = start(config("frontend", "v1")).await;
    let target = start(config("reviews", "v2")).await;
    let (_, report) =
        get_json(caller, &format!("/call?url=http://{target}/&n=10&concurrency=5&h2=true")).await;
    assert_eq!(report["status"], json!({"200": 10}));
    assert_eq!(report["versions"], json!({"v2": 10}));
    assert_eq!(report["errors"], 0);
}

#[tokio::test]
async fn http2_prior_knowledge_works_on_the_same_port() {
    let config = config("reviews", "v1");
    let address = start(config.clone()).await;
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    for path in ["/", "/?status=503"] {
        let request = Request::get(format!("http://{address}{path}")).body(Empty::<Bytes>::new()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), Version::HTTP_2);
        let status = response.status();
        let body: Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(status, if path == "/" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE });
        assert_eq!(body, identity_json(&config.identity));
    }
    // And HTTP/1.1 on the same port.
    assert_eq!(get(address, "/healthz").await.0, StatusCode::OK);
}

async fn channel(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap()
}

#[tokio::test]
async fn grpc_health_check_answers_serving() {
    let address = start(config("ratings", "v1")).await;
    let mut health = HealthClient::new(channel(address).await);
    for service in ["", "weft.demo.v1.Demo"] {
        let answer = health.check(HealthCheckRequest { service: service.into() }).await.unwrap();
        assert_eq!(answer.into_inner().status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.v1.Nope".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn grpc_demo_info_answers_identity() {
    let config = config("ratings", "v1");
    let address = start(config.clone()).await;
    let info = DemoClient::new(channel(address).await).info(InfoRequest {}).await.unwrap().into_inner();
    let Identity { service, version, pod, namespace } = config.identity;
    assert_eq!((info.service, info.version, info.pod, info.namespace), (service, version, pod, namespace));
}

#[tokio::test]
async fn grpc_unknown_method_is_unimplemented() {
    let address = start(Config::default()).await;
    let mut grpc = tonic::client::Grpc::new(channel(address).await);
    for path in ["/grpc.health.v1.Health/Watch", "/nope.v1.Nope/Call"] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(HealthCheckRequest::default()),
                path.parse().unwrap(),
                tonic_prost::ProstCodec::<HealthCheckRequest, ()>::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}");
    }
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let (stop, stopped) = oneshot::channel::<()>();
    let (address, server) = start_until(config("reviews", "v1"), async move {
        let _ = stopped.await;
    })
    .await;
    let in_flight = tokio::spawn(async move { get(address, "/?delay_ms=500").await.0 });
    // No signal says the request has reached the handler; give it ample time to.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).unwrap();
    assert_eq!(in_flight.await.unwrap(), StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("the server stops").unwrap();
    assert!(tokio::net::TcpStream::connect(address).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn fetch_once_returns_the_status_or_why_there_was_none() {
    let target = start(config("ratings", "v1")).await;
    assert_eq!(weft_demo::call::fetch_once(&format!("http://{target}/?status=418")).await, Ok(418));
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    assert!(weft_demo::call::fetch_once(&format!("http://{closed}/")).await.is_err());
    assert!(weft_demo::call::fetch_once("https://example.invalid/").await.is_err(), "only plain http");
}
