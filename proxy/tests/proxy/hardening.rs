//! Limits and timeouts, each with a test: header count and size, request-head read timeout,
//! idle timeout, connection cap, ambiguous framing, Host validation, HTTP/2 stream limits and
//! rapid reset.

use std::{sync::atomic::Ordering, time::Duration};

use http::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use weft_proxy::Settings;

use crate::support::*;

async fn proxy_with(tweak: impl FnOnce(&mut Settings)) -> (TestProxy, Backend) {
    let up = backend("up").await;
    let proxy = TestProxy::start_with(
        &format!(
            "services: [{{name: svc, ports: [{{number: 80, endpoints: [{{address: \"{}\"}}]}}]}}]",
            up.addr
        ),
        tweak,
    )
    .await;
    (proxy, up)
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let (proxy, up) = proxy_with(|s| {
        s.limits.max_headers = 20;
        s.limits.max_header_bytes = 8192;
    })
    .await;
    let mut many = String::from("GET / HTTP/1.1\r\nhost: svc\r\n");
    for i in 0..25 {
        many += &format!("x-h{i}: v\r\n");
    }
    many += "\r\n";
    assert!(raw_exchange(proxy.addr(), many.as_bytes()).await.starts_with("HTTP/1.1 431"));
    let big = format!("GET / HTTP/1.1\r\nhost: svc\r\nx-big: {}\r\n\r\n", "a".repeat(10_000));
    assert!(raw_exchange(proxy.addr(), big.as_bytes()).await.starts_with("HTTP/1.1 431"));
    assert_eq!(up.hits.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let (proxy, _up) = proxy_with(|s| s.timeouts.header_read = Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    // Slowloris: a partial head and then nothing.
    let reply = raw_exchange(proxy.addr(), b"GET / HTTP/1.1\r\nhost: svc\r\n").await;
    assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// hyper's own head-read timeout also runs while a keep-alive connection waits for its next
/// request, which would make it the idle timeout; the proxy's deadline starts at the first byte
/// of a request head instead.
#[tokio::test]
async fn idle_keep_alive_outlives_the_head_read_timeout() {
    let (proxy, _up) = proxy_with(|s| s.timeouts.header_read = Duration::from_millis(100)).await;
    let mut c = H1::connect(proxy.addr()).await;
    assert_eq!(c.get("svc", "/").await.status, StatusCode::OK);
    // Idle for four head-read timeouts. (A sleep is the point here: nothing signals that a
    // close did not happen.)
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.get("svc", "/").await.status, StatusCode::OK, "the idle connection is still open");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let (proxy, _up) = proxy_with(|s| s.timeouts.http_idle = Duration::from_millis(200)).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within("response", s.read(&mut buf)).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_since = tokio::time::Instant::now();
    // Read the rest of the response (if split), then expect EOF from the idle timeout.
    loop {
        let n = within("idle close", s.read(&mut buf)).await.unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    assert!(idle_since.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_accept() {
    let (proxy, _up) = proxy_with(|s| s.limits.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = H1::connect(proxy.addr()).await;
        assert_eq!(c.get("svc", "/").await.status, StatusCode::OK);
        held.push(c);
    }
    let reply = raw_exchange(proxy.addr(), b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n").await;
    assert!(reply.is_empty(), "third connection got {reply:?}");
    let text = proxy.handle.metrics.encode();
    assert!(text.contains(r#"weft_connections_rejected_total{listener="explicit"} 1"#), "{text}");
    drop(held);
}

/// Request smuggling: conflicting lengths and bad transfer codings get 400. Content-Length with
/// Transfer-Encoding is normalized by hyper (chunked wins, Content-Length is dropped, the
/// connection closes after the response, RFC 9112 section 6.1), so a smuggled second request is
/// never read and the backend sees exactly one request.
#[tokio::test]
async fn ambiguous_framing_is_rejected_or_normalized() {
    let (proxy, up) = proxy_with(|_| {}).await;
    for smuggle in [
        "POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
        "POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: +3\r\n\r\nabc",
    ] {
        let reply = raw_exchange(proxy.addr(), smuggle.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{smuggle:?} got {reply:?}");
    }
    assert_eq!(up.hits.load(Ordering::Relaxed), 0, "nothing reached the backend");

    let smuggle = "POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n\
                   0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: svc\r\n\r\n";
    let reply = raw_exchange(proxy.addr(), smuggle.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(reply.contains("connection: close"), "{reply:?}");
    assert!(!reply.contains("content-length\":"), "the upstream saw no Content-Length: {reply:?}");
    assert!(!reply.contains("/smuggled"), "{reply:?}");
    assert_eq!(up.hits.load(Ordering::Relaxed), 1, "exactly one request reached the backend");
}

/// RFC 9112 section 3.2: one Host on HTTP/1.1, well formed. A second Host (either order) is not
/// resolved by picking one: the route, the authorization and the app could read different ones.
#[tokio::test]
async fn a_missing_repeated_or_malformed_host_gets_400_and_reaches_no_one() {
    let (proxy, up) = proxy_with(|_| {}).await;
    for head in [
        "GET / HTTP/1.1\r\nhost: svc\r\nhost: other\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: other\r\nhost: svc\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: svc:abc\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: svc:99999\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: x@svc\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nhost:\r\n\r\n",
    ] {
        let reply = raw_exchange(proxy.addr(), head.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{head:?} got {reply:?}");
        assert!(reply.contains("x-weft-error: bad host"), "{reply:?}");
    }
    assert_eq!(up.hits.load(Ordering::Relaxed), 0, "nothing reached the backend");
    let served =
        raw_exchange(proxy.addr(), b"GET / HTTP/1.1\r\nhost: svc:80\r\nconnection: close\r\n\r\n").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served:?}");
    let text = metrics(&proxy).await;
    let bad = sample(&text, &["weft_requests_total{", "response_code=\"400\"", "response_flags=\"BR\""]);
    assert_eq!(bad, Some(7.0), "counted as the client's error:\n{text}");
}

#[tokio::test]
async fn http2_stream_limit_is_advertised_and_enforced() {
    let (proxy, _up) = proxy_with(|s| s.limits.h2_max_concurrent_streams = 5).await;
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (client, mut conn) = h2::client::handshake(stream).await.unwrap();
    let mut client = within("h2 ready", client.ready()).await.unwrap();
    // The first response proves the server's SETTINGS were processed.
    let (res, _) = client.send_request(http::Request::get("http://svc/").body(()).unwrap(), true).unwrap();
    let res = within("h2 response", async {
        tokio::select! {
            r = res => r,
            c = &mut conn => panic!("connection ended: {c:?}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(conn.max_concurrent_send_streams(), 5);
}

/// CVE-2023-44487: HEADERS immediately followed by RST_STREAM, as fast as possible. The proxy
/// sends GOAWAY long before the flood ends and the backend sees only a handful of requests.
#[tokio::test]
async fn http2_rapid_reset_gets_goaway() {
    let (proxy, up) = proxy_with(|s| s.limits.h2_max_pending_accept_reset_streams = 20).await;
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = within("h2 ready", client.ready()).await.unwrap();
    let mut sent = 0;
    const FLOOD: usize = 5_000;
    let flood = async {
        while sent < FLOOD {
            client = match client.ready().await {
                Ok(c) => c,
                Err(_) => break,
            };
            match client.send_request(http::Request::get("http://svc/slow?ms=1000").body(()).unwrap(), true) {
                Ok((_res, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
                Err(_) => break,
            }
            sent += 1;
            // Let the connection task write the frames.
            tokio::task::yield_now().await;
        }
    };
    within("flood", flood).await;
    let result = within("connection ends", conn).await.unwrap();
    let err = result.expect_err("the proxy ends the connection");
    assert!(err.is_go_away() || err.is_io() || err.reason().is_some(), "{err:?}");
    assert!(sent < FLOOD, "the connection survived {sent} rapid resets");
    assert!(
        up.hits.load(Ordering::Relaxed) < 200,
        "backend saw {} requests",
        up.hits.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn http2_local_error_resets_past_the_limit_get_goaway() {
    // Raw frames, because a well-behaved client library refuses to send malformed requests: each
    // HEADERS carries only `:method GET` (no :scheme or :path), so the proxy's HTTP/2 layer resets
    // the stream itself. Past the limit it must send GOAWAY (ENHANCE_YOUR_CALM) and close.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (proxy, up) = proxy_with(|s| s.limits.h2_max_local_error_reset_streams = 5).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let frame = |kind: u8, flags: u8, stream_id: u32, payload: &[u8]| {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream_id.to_be_bytes());
        bytes.extend(payload);
        bytes
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    const ATTEMPTS: u32 = 100;
    for i in 0..ATTEMPTS {
        // HEADERS, END_STREAM | END_HEADERS, HPACK static index 2 = `:method: GET`.
        out.extend(frame(0x1, 0x5, 2 * i + 1, &[0x82]));
    }
    let _ = within("write", stream.write_all(&out)).await;
    // Read frames until the proxy closes the connection; remember any GOAWAY's error code.
    let mut received = Vec::new();
    let _ = within("the proxy closes the connection", stream.read_to_end(&mut received)).await;
    let (mut at, mut goaway, mut resets) = (0, None, 0);
    while at + 9 <= received.len() {
        let length = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]) as usize;
        let kind = received[at + 3];
        let payload = &received[at + 9..(at + 9 + length).min(received.len())];
        match kind {
            0x3 => resets += 1,
            0x7 if payload.len() >= 8 => goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            _ => {}
        }
        at += 9 + length;
    }
    assert_eq!(goaway, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM (resets seen: {resets})");
    assert!(resets < ATTEMPTS, "the proxy reset all {resets} streams instead of ending the connection");
    assert_eq!(up.hits.load(Ordering::Relaxed), 0, "no malformed request reached the backend");
}
