//! The inbound policy enforced by a server-side proxy: PeerAuthentication's mTLS modes and
//! AuthorizationPolicy on HTTP and TCP, with the paths normalized once. The server proxy serves
//! the app's ports on explicit inbound listeners (exactly what the redirected inbound listener
//! does, minus SO_ORIGINAL_DST); mesh clients come through a client proxy and its mTLS tunnel.

use std::{sync::atomic::Ordering, time::SystemTime};

use http::{Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use weft_identity::ca::Issuer;
use weft_proxy::settings::{IdentitySource, InboundListener};

use crate::{
    mtls::{DAY, id, identity, outbound},
    support::*,
};

/// The server side of `app_ports` (one inbound listener each, in order) under `policy` (the
/// `inbound` config in flow YAML).
async fn server(issuer: &Issuer, policy: &str, app_ports: &[u16]) -> TestProxy {
    let files = identity(issuer, "reviews");
    let listeners: Vec<_> = app_ports
        .iter()
        .map(|p| InboundListener { addr: "127.0.0.1:0".parse().unwrap(), app_port: *p })
        .collect();
    TestProxy::start_with(&format!("inbound: {policy}\n"), move |s| {
        s.identity = Some(IdentitySource::Files(files));
        s.workload = "reviews-v1".into();
        s.namespace = "prod".into();
        s.explicit = vec![];
        s.inbound_explicit = listeners;
    })
    .await
}

/// A mesh client whose `reviews` service is the server proxy (HTTP on 9080, TCP `db` on 9000).
async fn mesh_client(issuer: &Issuer, sa: &str, server: &TestProxy) -> TestProxy {
    outbound(Some(identity(issuer, sa)), server.addr(), &id("reviews"), false).await
}

/// Whether a plain-text HTTP/1.1 request gets any answer (a refused connection closes silent).
async fn plain_get(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    let reply = raw_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    reply.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok())
}

#[tokio::test]
async fn strict_refuses_plain_text_and_serves_mesh_clients() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let inb = server(&issuer, "{mtlsMode: MTLS_STRICT}", &[app.addr.port()]).await;
    assert_eq!(plain_get(inb.addr(), "/").await, None, "plain text gets no answer");
    let mut tcp = TcpStream::connect(inb.addr()).await.unwrap();
    tcp.write_all(b"\x00binary").await.unwrap();
    let mut got = Vec::new();
    within("refused TCP closes", tcp.read_to_end(&mut got)).await.unwrap();
    assert!(got.is_empty());
    assert_eq!(app.hits.load(Ordering::Relaxed), 0, "nothing reached the app");
    let refused = sample(&metrics(&inb).await, &["weft_inbound_refused_total{", "reason=\"plaintext\""]);
    assert_eq!(refused, Some(2.0));

    let out = mesh_client(&issuer, "productpage", &inb).await;
    let reply = H1::connect(out.addr()).await.get("reviews:9080", "/").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(app.hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn permissive_serves_both_and_the_tls_label_tells_them_apart() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let inb = server(&issuer, "{mtlsMode: MTLS_PERMISSIVE}", &[app.addr.port()]).await;
    assert_eq!(plain_get(inb.addr(), "/").await, Some(200));
    let out = mesh_client(&issuer, "productpage", &inb).await;
    assert_eq!(H1::connect(out.addr()).await.get("reviews:9080", "/").await.status, StatusCode::OK);
    let text = metrics(&inb).await;
    for tls in ["tls=\"true\"", "tls=\"false\""] {
        let served =
            sample(&text, &["weft_requests_total{", "direction=\"inbound\"", "response_code=\"200\"", tls]);
        assert_eq!(served, Some(1.0), "{tls}:\n{text}");
    }
}

#[tokio::test]
async fn disable_serves_plain_text_and_ends_no_tunnel() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let inb = server(&issuer, "{mtlsMode: MTLS_DISABLE}", &[app.addr.port()]).await;
    assert_eq!(plain_get(inb.addr(), "/").await, Some(200));
    let out = mesh_client(&issuer, "productpage", &inb).await;
    let reply = H1::connect(out.addr()).await.get("reviews:9080", "/").await;
    assert_ne!(reply.status, StatusCode::OK, "the client's handshake reaches the app, which is not TLS");
    assert_eq!(app.hits.load(Ordering::Relaxed), 1, "only the plain request was served");
    let accepted = sample(&metrics(&inb).await, &["weft_tls_handshakes_total{", "side=\"accept\""]);
    assert_eq!(accepted, None, "no tunnel was ended");
}

#[tokio::test]
async fn port_level_mtls_overrides_the_workload_mode() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (strict_app, open_app) = (backend("strict").await, backend("open").await);
    let policy =
        format!("{{mtlsMode: MTLS_STRICT, portMtls: {{\"{}\": MTLS_PERMISSIVE}}}}", open_app.addr.port());
    let inb = server(&issuer, &policy, &[strict_app.addr.port(), open_app.addr.port()]).await;
    assert_eq!(plain_get(inb.handle.explicit_addrs[0], "/").await, None);
    assert_eq!(plain_get(inb.handle.explicit_addrs[1], "/").await, Some(200));
    assert_eq!((strict_app.hits.load(Ordering::Relaxed), open_app.hits.load(Ordering::Relaxed)), (0, 1));
}

const POLICIES: &str = r#"{authorizations: [
  {name: prod/allow-productpage, action: ALLOW, rules: [{from: [{principals: ["cluster.local/ns/prod/sa/productpage"]}]}]},
  {name: prod/deny-admin, action: DENY, rules: [{to: [{paths: ["/admin", "/admin/*"]}]}]}
]}"#;

#[tokio::test]
async fn http_requests_are_allowed_by_principal_and_denied_by_path_with_403_and_counted() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let inb = server(&issuer, POLICIES, &[app.addr.port()]).await;
    let out = mesh_client(&issuer, "productpage", &inb).await;
    let mut client = H1::connect(out.addr()).await;
    assert_eq!(client.get("reviews:9080", "/reviews/1").await.status, StatusCode::OK);
    let denied = client.get("reviews:9080", "/admin/users").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.headers["x-weft-error"], "denied by authorization policy");
    let other = mesh_client(&issuer, "ratings", &inb).await;
    assert_eq!(
        H1::connect(other.addr()).await.get("reviews:9080", "/reviews/1").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(plain_get(inb.addr(), "/reviews/1").await, Some(403), "plain text has no principal");
    // gRPC clients get PERMISSION_DENIED.
    let grpc = Request::post("http://reviews/admin/Svc/Call")
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap();
    let reply = H2::connect(inb.addr()).await.send(grpc).await;
    assert_eq!(reply.headers["grpc-status"], "7", "{reply:?}");
    assert_eq!(app.hits.load(Ordering::Relaxed), 1, "only the allowed request reached the app");

    let text = metrics(&inb).await;
    let count = |parts: &[&str]| sample(&text, &[&["weft_authz_decisions_total{"], parts].concat());
    assert_eq!(count(&["policy=\"prod/allow-productpage\"", "decision=\"allow\""]), Some(1.0), "{text}");
    assert_eq!(count(&["policy=\"prod/deny-admin\"", "decision=\"deny\""]), Some(2.0), "{text}");
    assert_eq!(count(&["policy=\"\"", "decision=\"deny\""]), Some(2.0), "no ALLOW matched: {text}");
    let flagged =
        sample(&text, &["weft_requests_total{", "response_code=\"403\"", "response_flags=\"RBAC\""]);
    assert!(flagged.is_some(), "{text}");
}

#[tokio::test]
async fn opaque_tcp_connections_are_decided_at_connect() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let echo = half_close_echo().await;
    let exchange = |addr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\x00\x01binary").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        within("TCP exchange", s.read_to_end(&mut got)).await.unwrap();
        got
    };
    // An ALLOW rule that needs a method never matches TCP; one on the port does.
    let allow_get =
        r#"{authorizations: [{name: prod/get, action: ALLOW, rules: [{to: [{methods: [GET]}]}]}]}"#;
    let inb = server(&issuer, allow_get, &[echo.port()]).await;
    assert_eq!(exchange(inb.addr()).await, b"");
    let allow_port = format!(
        "{{authorizations: [{{name: prod/port, action: ALLOW, rules: [{{to: [{{ports: [{}]}}]}}]}}]}}",
        echo.port()
    );
    inb.write_config(&format!("inbound: {allow_port}\n")).await.unwrap();
    assert_eq!(exchange(inb.addr()).await, b"got:\x00\x01binary");
    // A DENY rule's HTTP fields are dropped on TCP: it matches more.
    let deny_post =
        r#"{authorizations: [{name: prod/no-post, action: DENY, rules: [{to: [{methods: [POST]}]}]}]}"#;
    inb.write_config(&format!("inbound: {deny_post}\n")).await.unwrap();
    assert_eq!(exchange(inb.addr()).await, b"");
    let text = metrics(&inb).await;
    assert_eq!(
        sample(&text, &["weft_authz_decisions_total{", "policy=\"prod/no-post\"", "decision=\"deny\""]),
        Some(1.0)
    );
}

#[tokio::test]
async fn dry_run_policies_are_counted_and_not_enforced() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let policy = r#"{authorizations: [{name: prod/would-deny, action: DENY, dryRun: true, rules: [{to: [{paths: ["/admin"]}]}]}]}"#;
    let inb = server(&issuer, policy, &[app.addr.port()]).await;
    assert_eq!(plain_get(inb.addr(), "/admin").await, Some(200));
    let text = metrics(&inb).await;
    let parts = [
        "weft_authz_decisions_total{",
        "policy=\"prod/would-deny\"",
        "decision=\"deny\"",
        "dry_run=\"true\"",
    ];
    assert_eq!(sample(&text, &parts), Some(1.0), "{text}");
}

#[tokio::test]
async fn known_bypass_tricks_are_caught_and_the_app_sees_the_checked_path() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let policy = r#"{authorizations: [
      {name: prod/deny-admin, action: DENY, rules: [{to: [{paths: ["/admin", "/admin/*"]}]}]},
      {name: prod/deny-secret-host, action: DENY, rules: [{to: [{hosts: ["secret.ns"]}]}]},
      {name: prod/deny-root-user, action: DENY, rules: [{when: [{key: "request.headers[x-user]", values: [root]}]}]}
    ]}"#;
    let inb = server(&issuer, policy, &[app.addr.port()]).await;
    let send = |head: String| {
        let addr = inb.addr();
        async move {
            let reply = raw_exchange(addr, format!("{head}connection: close\r\n\r\n").as_bytes()).await;
            let status: u16 = reply.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            (status, body)
        }
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: reviews\r\n");
    // (request head, expected status, the path the app must see when it is served)
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        (get("//admin"), 403, None),
        (get("/a/../admin"), 403, None),
        (get("/%61dmin"), 403, None),
        (get("/admin%2F"), 400, None),
        (get("/admin%2fx"), 400, None),
        (get("/%2e%2e/admin"), 403, None),
        (get("/./admin/./x"), 403, None),
        // A backslash reads as a slash, as in Envoy.
        (get("/\\admin"), 403, None),
        (get("/admin;x"), 403, None),
        (get("/public/..;/admin"), 400, None),
        (get("/%2e%2e;x/admin"), 400, None),
        (get("/admin?x=1"), 403, None),
        (get("/ADMIN"), 200, Some("/ADMIN")),
        (get("/public//a/./b/../c?q=%2F"), 200, Some("/public/a/c?q=%2F")),
        (get("/%7Euser"), 200, Some("/~user")),
        ("GET / HTTP/1.1\r\nhost: SECRET.ns:80\r\n".into(), 403, None),
        ("GET / HTTP/1.1\r\nhost: secret.ns::80\r\n".into(), 400, None),
        ("GET http://secret.ns/ HTTP/1.1\r\nhost: reviews\r\n".into(), 403, None),
        ("GET http://x@secret.ns/ HTTP/1.1\r\nhost: reviews\r\n".into(), 400, None),
        ("GET / HTTP/1.1\r\nhost: reviews\r\nx-user: guest\r\nx-user: root\r\n".into(), 403, None),
        ("GET / HTTP/1.1\r\nhost: reviews\r\nx-user: guest\r\n".into(), 200, Some("/")),
    ];
    let mut served = 0;
    for (head, status, path) in cases {
        let (got, body) = send(head.clone()).await;
        assert_eq!(got, status, "{head:?}: {body}");
        if let Some(path) = path {
            served += 1;
            let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(seen["path"], path, "{head:?}");
        }
    }
    assert_eq!(app.hits.load(Ordering::Relaxed), served, "denied requests never reached the app");
}

#[tokio::test]
async fn a_forged_identity_header_satisfies_no_condition() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let policy = r#"{authorizations: [{name: prod/xfcc, action: ALLOW,
        rules: [{when: [{key: "request.headers[x-forwarded-client-cert]", values: ["*"]}]}]}]}"#;
    let inb = server(&issuer, policy, &[app.addr.port()]).await;
    let head = "GET / HTTP/1.1\r\nhost: reviews\r\nx-forwarded-client-cert: URI=spiffe://cluster.local/ns/prod/sa/admin\r\nconnection: close\r\n\r\n";
    let reply = raw_exchange(inb.addr(), head.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(app.hits.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_plain_text_connection_open_when_strict_arrives_is_refused_its_next_request() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = backend("reviews").await;
    let inb = server(&issuer, "{mtlsMode: MTLS_PERMISSIVE}", &[app.addr.port()]).await;
    let mut client = H1::connect(inb.addr()).await;
    assert_eq!(client.get("reviews", "/").await.status, StatusCode::OK);
    inb.write_config("inbound: {mtlsMode: MTLS_STRICT}\n").await.unwrap();
    let refused = client.get("reviews", "/").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.headers["x-weft-error"], "mutual TLS required");
    assert_eq!(app.hits.load(Ordering::Relaxed), 1);
}
