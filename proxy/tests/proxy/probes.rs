//! The app's probes on the admin port (`/app-health/...`): the proxy runs the original probe
//! against the app on loopback and answers the kubelet with the outcome.

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::mpsc,
};
use weft_proxy::probes::AppProbes;

use crate::support::*;

/// A proxy whose admin server answers these app probes (`WEFT_APP_PROBES` text), as the proxy
/// runs in a pod; the proxy lives as long as the returned value.
async fn admin_with(probes: &str) -> (TestProxy, SocketAddr) {
    let probes = AppProbes::parse(probes).unwrap();
    let proxy = TestProxy::start_with("services: []", |settings| settings.app_probes = probes).await;
    let addr = proxy.handle.admin_addr;
    (proxy, addr)
}

/// The kubelet's request for a rewritten probe.
async fn kubelet(admin: SocketAddr, method: Method, path: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", admin.to_string())
        .header("user-agent", "kube-probe/1.34")
        .header("accept", "*/*")
        .body(Full::<Bytes>::default())
        .unwrap();
    H1::connect(admin).await.send(req).await
}

/// A port that refuses connections and stays reserved while the returned socket lives: bound
/// but never listening, so no other test can take it in the meantime.
fn closed_port() -> (TcpSocket, u16) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

#[tokio::test]
async fn an_http_probe_answers_the_app_status() {
    let app = backend("app").await;
    let port = app.addr.port();
    let (_proxy, admin) = admin_with(&format!(
        r#"{{"/app-health/app/readyz": {{"port": {port}, "path": "/healthz"}},
            "/app-health/app/livez": {{"port": {port}, "path": "/status/503"}},
            "/app-health/app/startupz": {{"port": {port}, "path": "/status/302"}}}}"#
    ))
    .await;
    let ready = kubelet(admin, Method::GET, "/app-health/app/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body, "app answered 200\n", "our line, never the app's body");
    assert_eq!(kubelet(admin, Method::GET, "/app-health/app/livez").await.status, 503);
    // 3xx is a success for the kubelet: passed on as it is.
    assert_eq!(kubelet(admin, Method::GET, "/app-health/app/startupz").await.status, 302);
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_closed_port_or_a_slow_app_answers_503() {
    let app = backend("slow").await;
    let ((_reserved, closed), port) = (closed_port(), app.addr.port());
    let (_proxy, admin) = admin_with(&format!(
        r#"{{"/app-health/app/readyz": {{"port": {closed}, "path": "/healthz"}},
            "/app-health/app/livez": {{"port": {port}, "path": "/slow?ms=5000", "timeoutSeconds": 1}}}}"#
    ))
    .await;
    let refused = kubelet(admin, Method::GET, "/app-health/app/readyz").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&refused.body);
    assert!(body.starts_with("app probe failed: 127.0.0.1:") && body.contains("refused"), "{body}");

    let started = std::time::Instant::now();
    let slow = kubelet(admin, Method::GET, "/app-health/app/livez").await;
    assert_eq!(slow.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&slow.body).contains("no answer within 1s"), "{:?}", slow.body);
    assert!(started.elapsed() < std::time::Duration::from_secs(4), "the probe's own timeout applies");
}

#[tokio::test]
async fn a_tcp_probe_answers_whether_the_port_opens() {
    let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (open_port, (_reserved, closed)) = (open.local_addr().unwrap().port(), closed_port());
    let (_proxy, admin) = admin_with(&format!(
        r#"{{"/app-health/db/startupz": {{"port": {open_port}, "tcp": true}},
            "/app-health/db/livez": {{"port": {closed}, "tcp": true}}}}"#
    ))
    .await;
    let up = kubelet(admin, Method::GET, "/app-health/db/startupz").await;
    assert_eq!((up.status, &up.body[..]), (StatusCode::OK, &b"app port open\n"[..]));
    let down = kubelet(admin, Method::GET, "/app-health/db/livez").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    drop(open);
}

#[tokio::test]
async fn unknown_probe_paths_are_404_and_probes_are_get_only() {
    let app = backend("app").await;
    let (_proxy, admin) =
        admin_with(&format!(r#"{{"/app-health/app/readyz": {{"port": {}}}}}"#, app.addr.port())).await;
    for path in
        ["/app-health/app/livez", "/app-health/other/readyz", "/app-health/app/readyz/x", "/app-health/"]
    {
        assert_eq!(kubelet(admin, Method::GET, path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
    let post = kubelet(admin, Method::POST, "/app-health/app/readyz").await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The rest of the admin server is as it was.
    assert_eq!(kubelet(admin, Method::GET, "/live").await.status, StatusCode::OK);
    assert_eq!(kubelet(admin, Method::GET, "/app-health/app/readyz?x=1").await.status, StatusCode::OK);
}

/// An app that answers 200 and records each request's target and headers (the proxy never
/// copies the app's body to the kubelet, so the echo backend's reply cannot show them).
async fn recording_app() -> (u16, mpsc::UnboundedReceiver<(String, HeaderMap)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    let _ = tx.send((target, req.headers().clone()));
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"secret")))) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn the_probe_path_headers_and_host_reach_the_app() {
    let (port, mut seen) = recording_app().await;
    let (_proxy, admin) = admin_with(&format!(
        r#"{{"/app-health/app/readyz": {{"port": {port}, "path": "/echo?full=1", "headers": [["X-Probe", "ready"]]}},
            "/app-health/app/livez": {{"port": {port}, "path": "/echo", "headers": [["Host", "web.example"], ["User-Agent", "mine"]]}}}}"#
    ))
    .await;
    let ready = kubelet(admin, Method::GET, "/app-health/app/readyz").await;
    assert_eq!((ready.status, &ready.body[..]), (StatusCode::OK, &b"app answered 200\n"[..]));
    let (target, headers) = within("the app's request", seen.recv()).await.unwrap();
    assert_eq!(target, "/echo?full=1");
    assert_eq!(headers["x-probe"], "ready");
    assert_eq!(headers["host"], format!("127.0.0.1:{port}").as_str());
    assert_eq!(headers["user-agent"], "kube-probe/1.34", "the kubelet's own");
    assert_eq!(headers["accept"], "*/*");

    kubelet(admin, Method::GET, "/app-health/app/livez").await;
    let (_, headers) = within("the app's request", seen.recv()).await.unwrap();
    assert_eq!(headers.get_all("host").iter().collect::<Vec<_>>(), ["web.example"]);
    assert_eq!(headers["user-agent"], "mine");
}
