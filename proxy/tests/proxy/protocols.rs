//! Protocol detection, opaque TCP with half-close, server-first ports, upgrades and gRPC.

use std::{collections::VecDeque, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use weft_proxy::settings::ExplicitListener;

use crate::support::*;

/// A server that speaks first: a banner on accept, then echoes lines.
async fn server_first() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 hello\r\n").await.unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn tcp_config(name: &str, protocol: &str, addr: SocketAddr) -> String {
    format!(
        "version: t1\nservices:\n  - name: {name}\n    ports: [{{number: 9000, protocol: {protocol}, endpoints: [{{address: \"{addr}\"}}]}}]\n"
    )
}

async fn tcp_proxy(config: &str, target: &str, detect: Duration) -> TestProxy {
    let target = target.to_owned();
    TestProxy::start_with(config, move |s| {
        s.explicit =
            vec![ExplicitListener { addr: "127.0.0.1:0".parse().unwrap(), target: Some((target, 9000)) }];
        s.timeouts.detect = detect;
    })
    .await
}

#[tokio::test]
async fn opaque_tcp_is_detected_and_half_close_passes_through() {
    let echo = half_close_echo().await;
    let proxy =
        tcp_proxy(&tcp_config("db", "PROTOCOL_UNSPECIFIED", echo), "db", Duration::from_secs(5)).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"\x00\x01binary payload").await.unwrap();
    // Half-close: the server only answers after it sees our FIN.
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    within("reply after half-close", s.read_to_end(&mut out)).await.unwrap();
    assert_eq!(out, b"got:\x00\x01binary payload");

    let metrics = admin(&proxy, http::Method::GET, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    let labels = r#"{direction="explicit",source_workload="",source_namespace="",source_principal="",destination_workload="",destination_namespace="",destination_principal="",destination_service="db",tls="false"}"#;
    for want in [
        format!("weft_tcp_connections_opened_total{labels} 1"),
        format!("weft_tcp_connections_closed_total{labels} 1"),
        format!("weft_tcp_received_bytes_total{labels} 16"),
        format!("weft_tcp_sent_bytes_total{labels} 20"),
    ] {
        assert!(text.contains(&want), "missing {want} in\n{text}");
    }
}

#[tokio::test]
async fn idle_tcp_connections_are_closed() {
    // The upstream accepts and then stays silent.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (_s, _) = l.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let proxy = TestProxy::start_with(&tcp_config("quiet", "TCP", upstream), |s| {
        s.explicit = vec![ExplicitListener {
            addr: "127.0.0.1:0".parse().unwrap(),
            target: Some(("quiet".into(), 9000)),
        }];
        s.timeouts.tcp_idle = Duration::from_millis(200);
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let quiet = tokio::time::Instant::now();
    let mut buf = [0u8; 8];
    assert_eq!(within("idle close", s.read(&mut buf)).await.unwrap_or(0), 0);
    assert!(quiet.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn server_first_port_skips_detection() {
    let banner = server_first().await;
    // A detection timeout far longer than the test deadline: only skipping detection passes.
    let proxy = tcp_proxy(&tcp_config("smtp", "SERVER_FIRST", banner), "smtp", Duration::from_secs(60)).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 11];
    within("banner", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"220 hello\r\n");
    s.write_all(b"EHLO x\r\n").await.unwrap();
    let mut line = [0u8; 8];
    within("echo", s.read_exact(&mut line)).await.unwrap();
    assert_eq!(&line, b"EHLO x\r\n");
}

#[tokio::test]
async fn silent_client_falls_back_to_tcp_after_the_detection_timeout() {
    let banner = server_first().await;
    let proxy =
        tcp_proxy(&tcp_config("smtp", "PROTOCOL_UNSPECIFIED", banner), "smtp", Duration::from_millis(200))
            .await;
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 11];
    within("banner", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"220 hello\r\n");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(3), "{waited:?}");
}

#[tokio::test]
async fn opaque_ports_flag_skips_detection() {
    let banner = server_first().await;
    let config = tcp_config("mysql", "PROTOCOL_UNSPECIFIED", banner);
    let proxy = TestProxy::start_with(&config, |s| {
        s.explicit = vec![ExplicitListener {
            addr: "127.0.0.1:0".parse().unwrap(),
            target: Some(("mysql".into(), 9000)),
        }];
        s.opaque_ports = vec![9000];
        s.timeouts.detect = Duration::from_secs(60);
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 11];
    within("banner", s.read_exact(&mut buf)).await.unwrap();
}

#[tokio::test]
async fn websocket_upgrade_echoes_both_ways() {
    let up = backend("ws").await;
    let proxy = TestProxy::start(&format!(
        "services: [{{name: ws, ports: [{{number: 80, endpoints: [{{address: \"{}\"}}]}}]}}]",
        up.addr
    ))
    .await;
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/chat")
        .header("host", "ws")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::<Bytes>::default())
        .unwrap();
    let res = within("101", sender.send_request(req)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(res.headers()["upgrade"], "websocket");
    let upgraded = within("upgrade", hyper::upgrade::on(res)).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    for msg in [&b"\x81\x05hello"[..], b"\x81\x05world"] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within("echo", io.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg);
    }
}

// === gRPC over HTTP/2, with trailers ===

/// A gRPC-shaped server: `/test.Echo/Unary` answers one message; `/test.Echo/Stream` answers one
/// message per request message plus a final one; `/test.Echo/Fail` answers trailers-only status 13.
/// Every response ends with `grpc-status` trailers.
async fn grpc_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    assert_eq!(req.headers()["content-type"], "application/grpc");
                    assert_eq!(req.headers()["te"], "trailers", "te: trailers reaches the server");
                    let mut body = req.into_body();
                    let mut frames = VecDeque::new();
                    let mut count = 0u8;
                    while let Some(f) = body.frame().await {
                        if let Ok(data) = f.unwrap().into_data() {
                            if data.is_empty() {
                                continue;
                            }
                            count += 1;
                            frames.push_back(Frame::data(data));
                        }
                    }
                    let mut trailers = HeaderMap::new();
                    let mut res = Response::builder().header("content-type", "application/grpc");
                    if path.ends_with("/Fail") {
                        frames.clear();
                        trailers.insert("grpc-status", "13".parse().unwrap());
                        trailers.insert("grpc-message", "boom".parse().unwrap());
                    } else {
                        if path.ends_with("/Stream") {
                            frames.push_back(Frame::data(grpc_frame(&[b'n', count])));
                        }
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        res = res.header("x-handled", path.as_str());
                    }
                    frames.push_back(Frame::trailers(trailers));
                    Ok::<_, std::convert::Infallible>(res.body(Frames(frames)).unwrap())
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.into()
}

fn grpc_request(path: &str, body: BoxBody) -> Request<BoxBody> {
    Request::post(format!("http://echo{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn grpc_unary_and_streaming_keep_trailers() {
    let server = grpc_server().await;
    let mut proxy = TestProxy::start_with(
        &format!("services: [{{name: echo, ports: [{{number: 80, protocol: GRPC, endpoints: [{{address: \"{server}\"}}]}}]}}]"),
        |s| s.access_log = true,
    )
    .await;
    let mut client = H2::connect(proxy.addr()).await;

    let unary =
        client.send(grpc_request("/test.Echo/Unary", Full::new(grpc_frame(b"hi")).boxed_unsync())).await;
    assert_eq!(unary.status, StatusCode::OK);
    assert_eq!(unary.body, grpc_frame(b"hi"));
    assert_eq!(unary.trailers.as_ref().unwrap()["grpc-status"], "0");

    // Client streaming then server streaming: three messages sent as separate DATA frames.
    let (tx, rx) = mpsc::channel(4);
    let call = {
        let mut c = client.clone();
        tokio::spawn(async move {
            c.send(grpc_request("/test.Echo/Stream", ChannelBody(rx).boxed_unsync())).await
        })
    };
    for m in [&b"a"[..], b"bb", b"ccc"] {
        tx.send(Frame::data(grpc_frame(m))).await.unwrap();
    }
    drop(tx);
    let streamed = within("stream", call).await.unwrap();
    let mut want = Vec::new();
    for m in [&b"a"[..], b"bb", b"ccc", &[b'n', 3]] {
        want.extend_from_slice(&grpc_frame(m));
    }
    assert_eq!(streamed.body, want);
    assert_eq!(streamed.trailers.as_ref().unwrap()["grpc-status"], "0");

    let failed =
        client.send(grpc_request("/test.Echo/Fail", Full::new(grpc_frame(b"x")).boxed_unsync())).await;
    let trailers = failed.trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "13");
    assert_eq!(trailers["grpc-message"], "boom");

    // The metrics see grpc-status from the trailers.
    let metrics = admin(&proxy, http::Method::GET, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains(r#"weft_requests_total{direction="explicit",source_workload="",source_namespace="",source_principal="",destination_workload="",destination_namespace="",destination_principal="",destination_service="echo",response_code="200",grpc_status="13",tls="false",response_flags=""} 1"#), "{text}");
    assert!(text.contains(r#"grpc_status="0",tls="false",response_flags=""} 2"#), "{text}");

    // One access log line per request, with the gRPC status.
    let mut log = proxy.access_log.take().expect("access log");
    let mut lines = Vec::new();
    for _ in 0..3 {
        lines.push(within("access log", log.recv()).await.unwrap());
    }
    let fail: serde_json::Value = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|j| j["path"] == "/test.Echo/Fail")
        .unwrap();
    assert_eq!(fail["grpc_status"], "13");
    assert_eq!(fail["status"], 200);
    assert_eq!(fail["destination_service"], "echo");
    assert_eq!(fail["upstream"], server.to_string());
    assert_eq!(fail["protocol"], "HTTP/2.0");
    assert!(fail["request_id"].as_str().unwrap().len() == 36);
}
