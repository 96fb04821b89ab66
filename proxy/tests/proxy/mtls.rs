//! Mesh mTLS between two in-process proxies, like a sidecar pair: the client's proxy (`out`)
//! tunnels to the server's proxy (`inb`), which forwards to the backend in plain text.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{Method, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use weft_identity::{SpiffeId, ca::Issuer};
use weft_proxy::{
    admin::IdentityReport,
    settings::ExplicitListener,
    settings::{IdentityFiles, IdentitySource},
};

use crate::support::*;

pub const DAY: Duration = Duration::from_secs(86_400);
static DIRS: AtomicUsize = AtomicUsize::new(0);

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "prod", sa).unwrap()
}

/// Writes a certificate for `sa` from `issuer`, its key and the issuer's root to a new directory.
pub fn identity(issuer: &Issuer, sa: &str) -> IdentityFiles {
    let dir = std::env::temp_dir().join(format!(
        "weft-mtls-test-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let files = IdentityFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        trust_bundle: dir.join("ca.crt"),
    };
    write_cert(issuer, sa, &files);
    std::fs::write(&files.trust_bundle, issuer.root_pem()).unwrap();
    files
}

fn write_cert(issuer: &Issuer, sa: &str, files: &IdentityFiles) {
    let issued = issuer.issue(&id(sa), SystemTime::now(), DAY).unwrap();
    replace(&files.key, issued.key_pem.as_bytes());
    replace(&files.cert, issued.cert_pem.as_bytes());
}

/// Atomic replacement, as a writer of credentials must do.
fn replace(path: &PathBuf, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The server side: forwards `reviews` (HTTP, port 9080) and `db` (TCP, 9000) to plain backends.
async fn inbound(
    files: IdentityFiles,
    http: SocketAddr,
    tcp: SocketAddr,
    target: Option<(&str, u16)>,
) -> TestProxy {
    let config = format!(
        "services:\n  - name: reviews\n    ports: [{{number: 9080, endpoints: [{{address: \"{http}\"}}]}}]\n  - name: db\n    ports: [{{number: 9000, protocol: TCP, endpoints: [{{address: \"{tcp}\"}}]}}]\n"
    );
    let target = target.map(|(h, p)| (h.to_owned(), p));
    TestProxy::start_with(&config, move |s| {
        s.identity = Some(IdentitySource::Files(files));
        s.workload = "reviews-v1".into();
        s.explicit = vec![ExplicitListener { addr: "127.0.0.1:0".parse().unwrap(), target }];
    })
    .await
}

/// The client side: `reviews` and `db` are the inbound proxy, which runs as `server_identity`.
pub async fn outbound(
    files: Option<IdentityFiles>,
    inb: SocketAddr,
    server_identity: &SpiffeId,
    h2: bool,
) -> TestProxy {
    outbound_with_policy(files, inb, server_identity, h2, "{}").await
}

/// `outbound`, with `policy` as `reviews`' traffic policy.
async fn outbound_with_policy(
    files: Option<IdentityFiles>,
    inb: SocketAddr,
    server_identity: &SpiffeId,
    h2: bool,
    policy: &str,
) -> TestProxy {
    let protocol = if h2 { "HTTP2" } else { "PROTOCOL_UNSPECIFIED" };
    let endpoint = format!("{{address: \"{inb}\", identity: \"{server_identity}\", workload: reviews-v1}}");
    let config = format!(
        "services:\n  - name: reviews\n    ports: [{{number: 9080, protocol: {protocol}, endpoints: [{endpoint}]}}]\n    trafficPolicy: {policy}\n  - name: db\n    ports: [{{number: 9000, protocol: TCP, endpoints: [{endpoint}]}}]\n"
    );
    TestProxy::start_with(&config, move |s| {
        s.identity = files.map(IdentitySource::Files);
        s.workload = "productpage".into();
        s.namespace = "prod".into();
        s.explicit = vec![
            ExplicitListener { addr: "127.0.0.1:0".parse().unwrap(), target: None },
            ExplicitListener { addr: "127.0.0.1:0".parse().unwrap(), target: Some(("db".into(), 9000)) },
        ];
    })
    .await
}

#[tokio::test]
async fn http_crosses_the_tunnel_and_both_sides_name_each_other() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (backend, echo) = (backend("reviews").await, half_close_echo().await);
    let inb = inbound(identity(&issuer, "reviews"), backend.addr, echo, None).await;
    for h2 in [false, true] {
        let out = outbound(Some(identity(&issuer, "productpage")), inb.addr(), &id("reviews"), h2).await;
        let reply = if h2 {
            H2::connect(out.addr()).await.get("reviews:9080", "/h2").await
        } else {
            H1::connect(out.addr()).await.get("reviews:9080", "/h1").await
        };
        assert_eq!(reply.status, StatusCode::OK, "h2={h2}: {reply:?}");
        assert_eq!(reply.backend(), "reviews");
        assert_eq!(
            reply.json()["headers"]["x-forwarded-client-cert"],
            "By=spiffe://cluster.local/ns/prod/sa/reviews;URI=spiffe://cluster.local/ns/prod/sa/productpage",
            "the app learns the verified client"
        );

        let client = metrics(&out).await;
        let want = [
            "weft_requests_total{",
            "source_workload=\"productpage\"",
            "source_principal=\"spiffe://cluster.local/ns/prod/sa/productpage\"",
            "destination_workload=\"reviews-v1\"",
            "destination_principal=\"spiffe://cluster.local/ns/prod/sa/reviews\"",
            "tls=\"true\"",
        ];
        assert_eq!(sample(&client, &want), Some(1.0), "h2={h2}: client side:\n{client}");
    }
    let server = metrics(&inb).await;
    let want = [
        "weft_requests_total{",
        "source_principal=\"spiffe://cluster.local/ns/prod/sa/productpage\"",
        "source_namespace=\"prod\"",
        "destination_workload=\"reviews-v1\"",
        "destination_principal=\"spiffe://cluster.local/ns/prod/sa/reviews\"",
        "response_code=\"200\"",
        "tls=\"true\"",
    ];
    assert_eq!(sample(&server, &want), Some(2.0), "server side, HTTP/1.1 and HTTP/2:\n{server}");
    let tunnels = sample(&server, &["weft_tls_handshakes_total{", "side=\"accept\"", "result=\"ok\""]);
    assert_eq!(tunnels, Some(2.0), "one tunnel per client proxy:\n{server}");
}

/// An app that speaks HTTP/1.1 only and answers nothing until `n` requests are in, each with
/// the HTTP version and `Host` it got: `n` requests through the pair must be in flight at once.
async fn http1_app_answering_in_groups_of(n: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let group = Arc::new(tokio::sync::Barrier::new(n));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let group = group.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let group = group.clone();
                    async move {
                        group.wait().await;
                        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
                        let body = format!("{:?} {host} {}", req.version(), req.uri());
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    addr
}

/// Mesh tunnels the server side has accepted so far.
async fn tunnels_accepted(inb: &TestProxy) -> f64 {
    sample(&metrics(inb).await, &["weft_tls_handshakes_total{", "side=\"accept\"", "result=\"ok\""])
        .unwrap_or(0.0)
}

#[tokio::test]
async fn http1_requests_share_one_h2_tunnel_when_upgraded_and_reach_the_app_as_http1() {
    const IN_FLIGHT: usize = 8;
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = http1_app_answering_in_groups_of(IN_FLIGHT).await;
    let inb = inbound(identity(&issuer, "reviews"), app, half_close_echo().await, None).await;
    // One HTTP/2 tunnel for all the requests in flight, or one HTTP/1.1 tunnel each.
    for (policy, tunnels) in [("UPGRADE", 1.0), ("DO_NOT_UPGRADE", IN_FLIGHT as f64)] {
        let policy_yaml = format!("{{connectionPool: {{h2Upgrade: {policy}}}}}");
        let files = Some(identity(&issuer, "productpage"));
        let out = outbound_with_policy(files, inb.addr(), &id("reviews"), false, &policy_yaml).await;
        let before = tunnels_accepted(&inb).await;
        let requests: Vec<_> = (0..IN_FLIGHT)
            .map(|i| {
                let addr = out.addr();
                tokio::spawn(
                    async move { H1::connect(addr).await.get("reviews:9080", &format!("/r?{i}")).await },
                )
            })
            .collect();
        for (i, reply) in requests.into_iter().enumerate() {
            let reply = within("the group's answers", reply).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{policy}: {reply:?}");
            assert_eq!(
                reply.body,
                format!("HTTP/1.1 reviews:9080 /r?{i}"),
                "{policy}: as the client sent it"
            );
        }
        assert_eq!(
            tunnels_accepted(&inb).await - before,
            tunnels,
            "{policy}: tunnels for {IN_FLIGHT} requests"
        );
    }
}

/// An app that speaks HTTP/1.1 only and answers with how the request body came: its framing
/// (`content-length: N` or `chunked`), its length, and its bytes.
async fn http1_app_echoing_bodies() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let header =
                            |name| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                        let framing = match (header("content-length"), header("transfer-encoding")) {
                            (Some(n), None) => format!("content-length: {n}"),
                            (None, Some(te)) => te,
                            other => format!("{other:?}"),
                        };
                        let body = http_body_util::BodyExt::collect(req.into_body()).await?.to_bytes();
                        let answer =
                            [format!("{framing}; {} bytes; ", body.len()).as_bytes(), &body].concat();
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(answer),
                        )))
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn request_bodies_cross_the_h2_tunnel_with_their_http1_framing() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let app = http1_app_echoing_bodies().await;
    let inb = inbound(identity(&issuer, "reviews"), app, half_close_echo().await, None).await;
    let files = Some(identity(&issuer, "productpage"));
    let policy = "{connectionPool: {h2Upgrade: UPGRADE}}";
    let out = outbound_with_policy(files, inb.addr(), &id("reviews"), false, policy).await;

    // A body with a length: 100 KB, more than one HTTP/2 DATA frame and more than a TLS record.
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let req = req("reviews:9080", "/upload")
        .method(Method::POST)
        .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
        .unwrap();
    let reply = H1::connect(out.addr()).await.send(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    let want = [b"content-length: 100000; 100000 bytes; ".as_slice(), &body].concat();
    assert!(reply.body == want, "the body and its length arrive as sent");

    // A chunked body (no length): the app gets it chunked.
    let mut s = TcpStream::connect(out.addr()).await.unwrap();
    let chunked = "POST /upload HTTP/1.1\r\nhost: reviews:9080\r\ntransfer-encoding: chunked\r\n\
                   connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    s.write_all(chunked.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    within("the chunked upload's answer", s.read_to_end(&mut got)).await.unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("chunked; 11 bytes; hello world"), "{got}");
    assert_eq!(tunnels_accepted(&inb).await, 1.0, "both requests on the one HTTP/2 tunnel");
}

/// The server side as a proxy that predates `weft/h2-http1` ends tunnels: mesh mTLS with the
/// older tunnels only, an HTTP/1.1 app behind. Sends the ALPN of every tunnel it ends.
async fn older_inbound(files: &IdentityFiles) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let tls = weft_proxy::tls::MeshTls::load(files, SystemTime::now()).await.unwrap();
    let mut config = (*weft_identity::tls::server_config(&tls.creds, &tls.bundle).unwrap()).clone();
    config.alpn_protocols = [&b"weft/h2"[..], b"weft/http1", b"weft/tcp"].map(<[u8]>::to_vec).to_vec();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (alpns, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, alpns) = (acceptor.clone(), alpns.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let alpn = tls.get_ref().1.alpn_protocol().unwrap_or_default();
                let _ = alpns.send(String::from_utf8_lossy(alpn).into_owned());
                let svc = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"older proxy"),
                    )))
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_server_proxy_that_predates_the_h2_tunnel_gets_http1_tunnels() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (inb, mut alpns) = older_inbound(&identity(&issuer, "reviews")).await;
    let files = Some(identity(&issuer, "productpage"));
    let policy = "{connectionPool: {h2Upgrade: UPGRADE}}";
    let out = outbound_with_policy(files, inb, &id("reviews"), false, policy).await;
    for path in ["/first", "/second"] {
        let reply = H1::connect(out.addr()).await.get("reviews:9080", path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {reply:?}");
        assert_eq!(reply.body, "older proxy");
    }
    // The offer of weft/h2-http1 got weft/http1: that tunnel is dropped, and the endpoint's
    // requests take a pooled HTTP/1.1 tunnel from then on (the second request reuses it).
    for _ in 0..2 {
        assert_eq!(within("a tunnel", alpns.recv()).await.as_deref(), Some("weft/http1"));
    }
    assert!(alpns.try_recv().is_err(), "no third tunnel");
}

#[tokio::test]
async fn an_upgrade_keeps_an_http1_tunnel_when_requests_go_over_h2() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (backend, echo) = (backend("reviews").await, half_close_echo().await);
    let inb = inbound(identity(&issuer, "reviews"), backend.addr, echo, None).await;
    let files = Some(identity(&issuer, "productpage"));
    let policy = "{connectionPool: {h2Upgrade: UPGRADE}}";
    let out = outbound_with_policy(files, inb.addr(), &id("reviews"), false, policy).await;
    let req = req("reviews:9080", "/chat")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    let stream = TcpStream::connect(out.addr()).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    let res = within("101", sender.send_request(req)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = within("upgrade", hyper::upgrade::on(res)).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"\x81\x05hello").await.unwrap();
    let mut back = [0u8; 7];
    within("echo", io.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"\x81\x05hello");
    // A plain request on the same destination still goes over HTTP/2.
    let reply = H1::connect(out.addr()).await.get("reviews:9080", "/after").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["version"], "HTTP/1.1", "{reply:?}");
    assert_eq!(tunnels_accepted(&inb).await, 2.0, "the upgrade's HTTP/1.1 tunnel and one HTTP/2 tunnel");
}

#[tokio::test]
async fn a_client_cannot_forge_the_identity_header() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (backend, echo) = (backend("reviews").await, half_close_echo().await);
    let inb = inbound(identity(&issuer, "reviews"), backend.addr, echo, None).await;
    let forged = |host: &str| {
        req(host, "/")
            .header("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/prod/sa/admin")
            .body(http_body_util::Full::default())
            .unwrap()
    };
    // Plain text straight to the server side: removed, nothing verified to put instead.
    let reply = H1::connect(inb.addr()).await.send(forged("reviews:9080")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["headers"].get("x-forwarded-client-cert"), None, "{reply:?}");
    // Through a client proxy and the tunnel: only the verified identity arrives.
    let out = outbound(Some(identity(&issuer, "productpage")), inb.addr(), &id("reviews"), false).await;
    let reply = H1::connect(out.addr()).await.send(forged("reviews:9080")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["headers"]["x-forwarded-client-cert"],
        "By=spiffe://cluster.local/ns/prod/sa/reviews;URI=spiffe://cluster.local/ns/prod/sa/productpage"
    );
}

#[tokio::test]
async fn opaque_tcp_crosses_the_tunnel_with_half_close() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (backend, echo) = (backend("reviews").await, half_close_echo().await);
    // The server side treats everything arriving on its listener as `db` traffic.
    let inb = inbound(identity(&issuer, "reviews"), backend.addr, echo, Some(("db", 9000))).await;
    let out = outbound(Some(identity(&issuer, "productpage")), inb.addr(), &id("reviews"), false).await;
    let mut s = TcpStream::connect(out.handle.explicit_addrs[1]).await.unwrap();
    s.write_all(b"\x00\x01binary").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("echo through the tunnel", s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"got:\x00\x01binary");
    let server = metrics(&inb).await;
    let opened = ["weft_tcp_connections_opened_total{", "productpage", "tls=\"true\""];
    assert_eq!(sample(&server, &opened), Some(1.0), "{server}");
}

#[tokio::test]
async fn a_server_with_another_identity_or_root_gets_no_request() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let foreign = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (backend, echo) = (backend("reviews").await, half_close_echo().await);
    let inb = inbound(identity(&issuer, "reviews"), backend.addr, echo, None).await;
    let cases = [
        ("the config expects ratings", identity(&issuer, "productpage"), id("ratings")),
        ("the client's certificate is from another root", identity(&foreign, "productpage"), id("reviews")),
    ];
    for (why, files, expected) in cases {
        let out = outbound(Some(files), inb.addr(), &expected, false).await;
        let reply = H1::connect(out.addr()).await.get("reviews:9080", "/").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{why}: {reply:?}");
    }
    assert_eq!(backend.hits.load(Ordering::Relaxed), 0);
    let failed =
        sample(&metrics(&inb).await, &["weft_tls_handshakes_total{", "side=\"accept\"", "result=\"error\""]);
    // Each request is tried twice: a failed handshake is a connect failure, which the default
    // retry policy tries once more.
    assert_eq!(failed, Some(4.0));
}

#[tokio::test]
async fn tls_not_meant_for_the_mesh_passes_through_byte_for_byte() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (backend, echo) = (backend("reviews").await, half_close_echo().await);
    let inb = inbound(identity(&issuer, "reviews"), backend.addr, echo, Some(("db", 9000))).await;
    // The app's own TLS: a ClientHello offering `h2`, not a `weft/*` tunnel.
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "app.example".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();

    let mut s = TcpStream::connect(inb.addr()).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("passthrough echo", s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, [b"got:".as_slice(), &hello].concat());
}

#[tokio::test]
async fn bad_identity_files_keep_the_running_identity() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (backend, echo) = (backend("reviews").await, half_close_echo().await);
    let files = identity(&issuer, "reviews");
    let inb = inbound(files.clone(), backend.addr, echo, None).await;
    assert_eq!(admin(&inb, Method::GET, "/ready").await.status, StatusCode::OK);

    replace(&files.cert, b"not a certificate");
    let errors = ["weft_identity_reloads_total{", "result=\"error\""];
    within("the bad file is noticed", async {
        while sample(&metrics(&inb).await, &errors).is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Still ready, and still the same identity.
    assert_eq!(admin(&inb, Method::GET, "/ready").await.status, StatusCode::OK);
    let out = outbound(Some(identity(&issuer, "productpage")), inb.addr(), &id("reviews"), false).await;
    let reply = H1::connect(out.addr()).await.get("reviews:9080", "/").await;
    assert_eq!(reply.status, StatusCode::OK, "the running identity still serves");

    write_cert(&issuer, "reviews", &files);
    let loaded = ["weft_identity_reloads_total{", "result=\"ok\""];
    within("the renewed certificate loads", async {
        while sample(&metrics(&inb).await, &loaded) != Some(2.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn identity_shows_the_certificate_its_issuer_and_the_trust_bundle() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let files = identity(&issuer, "reviews");
    let proxy =
        TestProxy::start_with("services: []\n", |s| s.identity = Some(IdentitySource::Files(files))).await;
    let reply = admin(&proxy, Method::GET, "/identity").await;
    assert_eq!(reply.status, StatusCode::OK);
    let report: IdentityReport = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(report.identity.as_deref(), Some("spiffe://cluster.local/ns/prod/sa/reviews"));
    let [root] = &report.trust_bundle[..] else { panic!("one root: {report:?}") };
    let leaf = report.certificate.as_ref().expect("a certificate");
    assert_eq!(leaf.issuer, root.subject);
    assert_eq!(leaf.not_after_unix_seconds - leaf.not_before_unix_seconds, DAY.as_secs() as i64 + 60);
    assert_eq!((report.chain_length, report.next_renewal_unix_seconds), (1, None), "files are not renewed");
}

#[tokio::test]
async fn without_loadable_identity_files_the_proxy_is_not_ready() {
    let dir = std::env::temp_dir().join(format!("weft-mtls-missing-{}", std::process::id()));
    let files = IdentityFiles { cert: dir.join("c"), key: dir.join("k"), trust_bundle: dir.join("b") };
    let proxy =
        TestProxy::start_with("services: []\n", |s| s.identity = Some(IdentitySource::Files(files))).await;
    let ready = admin(&proxy, Method::GET, "/ready").await;
    assert_eq!(
        (ready.status, &ready.body[..]),
        (StatusCode::SERVICE_UNAVAILABLE, &b"no identity loaded\n"[..])
    );
    let identity = admin(&proxy, Method::GET, "/identity").await;
    assert_eq!(identity.status, StatusCode::SERVICE_UNAVAILABLE);
    let report: IdentityReport = serde_json::from_slice(&identity.body).unwrap();
    assert_eq!((report.identity, report.certificate, report.trust_bundle.len()), (None, None, 0));
}
