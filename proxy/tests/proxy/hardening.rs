//! Limits and timeouts, each with a test: header count and size (HTTP/2 too), request-target
//! length, request-head read timeout, request-body timeout, idle timeout, connection cap,
//! ambiguous framing, bad chunked bodies and clients leaving mid-body (never the upstream's
//! failure), slow request bodies, Host validation, HTTP/2 stream limits, rapid reset, floods of
//! HTTP/2 frames that carry no request, and rate-limited flood logs.
//! Each asserts what the origin received, not only the status.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

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

async fn proxy_to(origin: std::net::SocketAddr, tweak: impl FnOnce(&mut Settings)) -> TestProxy {
    let yaml = format!(
        "services: [{{name: svc, ports: [{{number: 80, protocol: HTTP1, endpoints: [{{address: \"{origin}\"}}]}}]}}]"
    );
    TestProxy::start_with(&yaml, tweak).await
}

/// The next access log line, as JSON.
async fn next_log_line(proxy: &mut TestProxy) -> serde_json::Value {
    let line = within("access log line", proxy.access_log.as_mut().unwrap().recv()).await.unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Bad chunked framing is the client's error: 400 (`BR`), never 502 `UC` counted against the
/// destination. The proxy streams a body as it arrives, so the origin gets the head and the
/// chunks before the bad one, then a closed connection: never a complete request, never the
/// bytes after the bad chunk.
#[tokio::test]
async fn bad_chunked_framing_from_the_client_gets_400_and_is_not_blamed_on_the_upstream() {
    let origin = raw_origin().await;
    let mut proxy = proxy_to(origin.addr, |s| s.access_log = true).await;
    let head = "POST /upload HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n";
    let cases = [
        ("chunk size overflow", "fffffffffffffffffffff\r\nSMUGGLED\r\n0\r\n\r\n"),
        ("0x in the chunk size", "0x8\r\nSMUGGLED\r\n0\r\n\r\n"),
        ("bare LF in the size line", "8\nSMUGGLED\r\n0\r\n\r\n"),
        ("data longer than its size", "1\r\nSMUGGLED\r\n0\r\n\r\n"),
    ];
    for (i, (what, rest)) in cases.iter().enumerate() {
        let reply = raw_exchange(proxy.addr(), format!("{head}{rest}").as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{what}: {reply:?}");
        assert!(reply.contains("x-weft-error: malformed request body"), "{what}: {reply:?}");
        let log = next_log_line(&mut proxy).await;
        assert_eq!(
            (log["status"].as_u64(), log["response_flags"].as_str()),
            (Some(400), Some("BR")),
            "{what}"
        );
        origin.wait_closed(i + 1).await;
    }
    let received = origin.requests();
    assert_eq!(received.len(), cases.len(), "{received:?}");
    for request in received {
        assert!(request.starts_with("POST /upload HTTP/1.1\r\n"), "{request:?}");
        assert!(request.contains("\r\n\r\n3\r\nabc\r\n"), "the good chunk went on: {request:?}");
        // At most the declared size of the bad chunk (1 byte of "SMUGGLED") went on, never the
        // end of the body.
        assert!(!request.contains("MUGGLED") && !request.contains("\r\n0\r\n\r\n"), "{request:?}");
    }
    let text = metrics(&proxy).await;
    let bad = sample(&text, &["weft_requests_total{", "response_code=\"400\"", "response_flags=\"BR\""]);
    assert_eq!(bad, Some(4.0), "counted as the client's error:\n{text}");
    assert!(!text.contains("response_code=\"502\""), "nothing counted as the upstream's:\n{text}");
}

/// A client that goes away in the middle of its request body is not the upstream's failure:
/// counted with `DC`, never `UC` or a 5xx; the origin's connection is closed after the bytes
/// that came.
#[tokio::test]
async fn a_client_that_leaves_mid_body_is_not_counted_against_the_upstream() {
    let origin = raw_origin().await;
    let mut proxy = proxy_to(origin.addr, |s| s.access_log = true).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: svc\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    // Leave once the proxy has forwarded the ten bytes.
    origin.wait_received(|r| r.first().is_some_and(|r| r.ends_with(b"0123456789"))).await;
    drop(s);
    let log = next_log_line(&mut proxy).await;
    let flags = log["response_flags"].as_str().unwrap().to_owned();
    assert!(flags.contains("DC") && !flags.contains("UC"), "{log}");
    assert!(log["status"].as_u64().is_some_and(|s| s < 500), "{log}");
    origin.wait_closed(1).await;
    assert!(origin.requests()[0].ends_with("\r\n\r\n0123456789"), "{:?}", origin.requests());
    let text = metrics(&proxy).await;
    assert!(!text.contains("response_flags=\"UC\""), "{text}");
}

/// RFC 9110 section 15.5.15: a request target longer than the proxy accepts gets 414, also when
/// it is longer than the whole head may be (hyper alone says 431 then), on HTTP/1.1 and HTTP/2
/// (`:path`), and reaches no one.
#[tokio::test]
async fn a_70_kib_uri_gets_414_and_reaches_no_one() {
    let (proxy, up) = proxy_with(|_| {}).await;
    let huge = format!("GET /{} HTTP/1.1\r\nhost: svc\r\n\r\n", "a".repeat(70 * 1024));
    let reply = raw_exchange_lenient(proxy.addr(), huge.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 414"), "{:?}", &reply[..reply.len().min(300)]);
    assert!(reply.contains("x-weft-error: uri too long"), "{reply:?}");
    assert_eq!(up.hits.load(Ordering::Relaxed), 0, "nothing reached the backend");

    // Under --max-uri-bytes, within the head limit: 414 on both versions; shorter URIs pass.
    let (proxy, up) = proxy_with(|s| s.limits.max_uri_bytes = 1024).await;
    let long = format!("/{}", "b".repeat(2000));
    let head = format!("GET {long} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n");
    let reply = raw_exchange(proxy.addr(), head.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 414"), "{:?}", &reply[..reply.len().min(300)]);
    let mut h2 = H2::connect(proxy.addr()).await;
    let reply = h2.get("svc", &long).await;
    assert_eq!(reply.status, StatusCode::URI_TOO_LONG);
    assert_eq!(reply.headers["x-weft-error"], "uri too long");
    assert_eq!(up.hits.load(Ordering::Relaxed), 0, "nothing reached the backend");
    let fits = format!("/{}", "c".repeat(1000));
    let reply = h2.get("svc", &fits).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["path"], fits.as_str(), "the origin got the URI as sent");
    let mut h1 = H1::connect(proxy.addr()).await;
    assert_eq!(h1.get("svc", &fits).await.json()["path"], fits.as_str());
    let text = metrics(&proxy).await;
    let refused = sample(&text, &["weft_requests_total{", "response_code=\"414\"", "response_flags=\"BR\""]);
    assert_eq!(refused, Some(2.0), "counted as the client's error:\n{text}");
}

/// HTTP/1.1 stops at --max-headers (100) fields; an HTTP/2 request gets the same limit (only
/// the 64 KiB header list applied before): 1,000 fields get 431 and reach no one, 100 pass.
#[tokio::test]
async fn an_http2_request_with_1000_header_fields_gets_431_like_http1() {
    let (proxy, up) = proxy_with(|_| {}).await;
    let request = |fields: usize| {
        let mut req = http::Request::get("http://svc/").body(empty()).unwrap();
        for i in 0..fields {
            let name = http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap();
            req.headers_mut().insert(name, http::HeaderValue::from_static("v"));
        }
        req
    };
    let mut h2 = H2::connect(proxy.addr()).await;
    let reply = h2.send(request(1000)).await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(reply.headers["x-weft-error"], "too many request headers");
    assert_eq!(up.hits.load(Ordering::Relaxed), 0, "nothing reached the backend");
    let reply = h2.send(request(100)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["headers"]["x-h99"], "v", "the origin got all 100");
    let reply = h2.send(request(101)).await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(up.hits.load(Ordering::Relaxed), 1);
}

/// A request body that stops arriving ends the request after --request-body-timeout: 408 and a
/// closed connection (HTTP/1.1), 408 on the stream (HTTP/2). The origin got the head and the
/// bytes that came, then a closed connection.
#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    const LIMIT: Duration = Duration::from_millis(300);
    let origin = raw_origin().await;
    let mut proxy = proxy_to(origin.addr, |s| {
        s.timeouts.request_body = LIMIT;
        s.access_log = true;
    })
    .await;
    let started = tokio::time::Instant::now();
    let reply =
        raw_exchange(proxy.addr(), b"POST /upload HTTP/1.1\r\nhost: svc\r\ncontent-length: 100000\r\n\r\nx")
            .await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(reply.contains("connection: close"), "{reply:?}");
    assert!(started.elapsed() >= LIMIT);
    let log = next_log_line(&mut proxy).await;
    assert_eq!((log["status"].as_u64(), log["response_flags"].as_str()), (Some(408), Some("SI")), "{log}");
    origin.wait_closed(1).await;
    let request = &origin.requests()[0];
    assert!(request.contains("content-length: 100000\r\n") && request.ends_with("\r\n\r\nx"), "{request:?}");

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(http_body::Frame::data(bytes::Bytes::from_static(b"y"))).await.unwrap();
    let body = http_body_util::BodyExt::boxed_unsync(ChannelBody(rx));
    let mut h2 = H2::connect(proxy.addr()).await;
    let started = tokio::time::Instant::now();
    let reply = h2.send(http::Request::post("http://svc/upload").body(body).unwrap()).await;
    assert_eq!(reply.status, StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() >= LIMIT);
    origin.wait_closed(2).await;
    assert!(origin.requests()[1].ends_with("\r\n\r\n1\r\ny\r\n"), "{:?}", origin.requests());
    drop(tx);
    let text = metrics(&proxy).await;
    assert!(!text.contains("response_code=\"5"), "nothing counted as the upstream's:\n{text}");
}

/// A body that keeps coming at or above the minimum rate, here one byte per 100 ms (10 bytes/s)
/// against a 300 ms limit and 5 bytes/s, arrives whole however long it takes in total.
#[tokio::test]
async fn a_slow_but_steady_request_body_is_not_cut() {
    let up = scripted(|_| Act::Status(200)).await;
    let proxy = proxy_to(up.addr, |s| {
        s.timeouts.request_body = Duration::from_millis(300);
        s.timeouts.request_body_min_rate = 5;
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: svc\r\ncontent-length: 6\r\n\r\n").await.unwrap();
    for byte in b"abcdef" {
        // Pacing the client is the point of this test.
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&[*byte]).await.unwrap();
    }
    let mut buf = vec![0u8; 1024];
    let n = within("response", s.read(&mut buf)).await.unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert_eq!(up.seen.lock().unwrap()[0].1, "abcdef", "the origin got the whole body");
}

/// The issue's slow body, scaled down: `Content-Length: 100000`, then one byte every 50 ms.
/// Each wait is far under the 300 ms timeout, so only the minimum rate (100 bytes/s, i.e. the
/// body may take 300 ms plus 10 ms per byte of waiting) ends it: 408 `SI` after about eight bytes,
/// and the origin got the head and those bytes, never the whole body.
#[tokio::test]
async fn a_request_body_below_the_minimum_rate_gets_408() {
    let origin = raw_origin().await;
    let mut proxy = proxy_to(origin.addr, |s| {
        s.timeouts.request_body = Duration::from_millis(300);
        s.timeouts.request_body_min_rate = 100;
        s.access_log = true;
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: svc\r\ncontent-length: 100000\r\n\r\n").await.unwrap();
    let (mut read, mut write) = s.split();
    const MOST: usize = 100;
    let mut sent = 0;
    let trickle = async {
        while sent < MOST {
            // Pacing the client is the point of this test.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if write.write_all(b"x").await.is_err() {
                break;
            }
            sent += 1;
        }
    };
    let mut reply = Vec::new();
    within("the proxy cuts the body", async {
        tokio::select! {
            _ = read.read_to_end(&mut reply) => {}
            _ = trickle => panic!("{MOST} bytes at 20 bytes/s and the body was not cut"),
        }
    })
    .await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(reply.contains("connection: close"), "{reply:?}");
    let log = next_log_line(&mut proxy).await;
    assert_eq!((log["status"].as_u64(), log["response_flags"].as_str()), (Some(408), Some("SI")), "{log}");
    origin.wait_closed(1).await;
    let request = &origin.requests()[0];
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("content-length: 100000"), "{request:?}");
    assert!(body.len() <= sent && body.len() < 20 && body.bytes().all(|b| b == b'x'), "{request:?}");
}

/// Log lines written on this thread (the test's current-thread runtime runs the proxy too), with
/// the proxy's `--log` filter over `level`.
fn capture_logs(level: &str) -> (Arc<std::sync::Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let capture = Capture(lines.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(weft_proxy::log_limit::filter(level)))
        .with_ansi(false)
        .with_writer(move || capture.clone())
        .finish();
    (lines, tracing::subscriber::set_default(subscriber))
}

/// Raw HTTP/2: a connection that opens streams and resets them at once, faster than the proxy
/// accepts them, until the proxy ends the connection; what the proxy sent back.
async fn rapid_reset_connection(addr: std::net::SocketAddr) -> Vec<u8> {
    let frame = |kind: u8, flags: u8, stream_id: u32, payload: &[u8]| {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream_id.to_be_bytes());
        bytes.extend(payload);
        bytes
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    // HPACK: GET, http, /, then `:authority: svc` as a literal without indexing.
    let headers = [0x82, 0x86, 0x84, 0x01, 0x03, b's', b'v', b'c'];
    for i in 0..100u32 {
        out.extend(frame(0x1, 0x4, 2 * i + 1, &headers)); // HEADERS, END_HEADERS
        out.extend(frame(0x3, 0, 2 * i + 1, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(&out).await;
    let mut received = Vec::new();
    let _ = within("the proxy ends the connection", stream.read_to_end(&mut received)).await;
    received
}

/// A reset flood over many connections writes one warning, not one per connection: the first
/// connection is logged, the next ones are counted into the next line (at most one per 10 s).
#[tokio::test]
async fn a_reset_flood_over_many_connections_logs_one_line_not_one_per_connection() {
    let (logs, _guard) = capture_logs("warn");
    let (proxy, up) = proxy_with(|_| {}).await;
    const CONNECTIONS: usize = 5;
    for _ in 0..CONNECTIONS {
        let received = rapid_reset_connection(proxy.addr()).await;
        let mut at = 0;
        let mut goaway = None;
        while at + 9 <= received.len() {
            let length = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]) as usize;
            let payload = &received[at + 9..(at + 9 + length).min(received.len())];
            if received[at + 3] == 0x7 && payload.len() >= 8 {
                goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            at += 9 + length;
        }
        assert_eq!(goaway, Some(0xb), "GOAWAY ENHANCE_YOUR_CALM: {received:?}");
    }
    assert!(up.hits.load(Ordering::Relaxed) < 200, "the origin was spared most of the flood");
    drop(proxy);
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one line for {CONNECTIONS} connections:\n{text}");
    assert!(warnings[0].contains("flooded") && warnings[0].contains("suppressed=0"), "{text}");
}

/// An HTTP/2 frame: 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    bytes.extend([kind, flags]);
    bytes.extend(stream_id.to_be_bytes());
    bytes.extend(payload);
    bytes
}

/// CPU time this thread has used (user and system, in clock ticks): the test's current-thread
/// runtime runs the client and the in-process proxy alike, and no other test.
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // Fields 14 and 15 of proc(5) (utime, stime); the split starts at field 3.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// What one flooding connection got: the GOAWAY's last stream and error code, if one came; how
/// many of the flood's frames the client managed to write before the connection ended; and the
/// CPU ticks the whole exchange took.
struct Flood {
    goaway: Option<(u32, u32)>,
    written: usize,
    cpu_ticks: u64,
}

/// The client preface and SETTINGS, then `FLOOD_FRAMES` copies of `frame` as fast as the
/// connection takes them, while reading what the proxy sends until it ends the connection.
const FLOOD_FRAMES: usize = 1_000_000;

async fn flood(addr: std::net::SocketAddr, frame: &[u8]) -> Flood {
    const BATCH: usize = 10_000;
    let batch = frame.repeat(BATCH);
    let cpu = thread_cpu_ticks();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    stream.write_all(&start).await.unwrap();
    let (mut read, mut write) = stream.split();
    let mut written = 0;
    let writing = async {
        while written < FLOOD_FRAMES {
            if write.write_all(&batch).await.is_err() {
                break;
            }
            written += BATCH;
        }
    };
    let mut received = Vec::new();
    let reading = async {
        let mut buf = vec![0u8; 16 * 1024];
        // A reset after the GOAWAY (the proxy closes with the flood unread) ends it too.
        while let Ok(n @ 1..) = read.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
        }
    };
    // Both end once the proxy closes the connection; without the budget neither would within
    // the deadline (the proxy keeps answering, the connection stays open).
    within("the proxy ends the flooding connection", async { tokio::join!(writing, reading) }).await;
    let cpu_ticks = thread_cpu_ticks() - cpu;
    let (mut at, mut goaway) = (0, None);
    while at + 9 <= received.len() {
        let length = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]) as usize;
        let payload = &received[at + 9..(at + 9 + length).min(received.len())];
        if received[at + 3] == 0x7 && payload.len() >= 8 {
            let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
            goaway = Some((last, u32::from_be_bytes(payload[4..8].try_into().unwrap())));
        }
        at += 9 + length;
    }
    Flood { goaway, written, cpu_ticks }
}

/// Whether the flood was cut short and cheaply: GOAWAY ENHANCE_YOUR_CALM (no stream was opened),
/// the client could not write the whole flood, and the exchange took under a second of CPU (h2
/// answering a million frames takes many, in a debug build).
fn assert_cut(what: &str, flood: &Flood) {
    let ticks_per_second = 100; // USER_HZ on Linux
    assert_eq!(flood.goaway, Some((0, 0xb)), "{what}: GOAWAY ENHANCE_YOUR_CALM");
    assert!(flood.written < FLOOD_FRAMES, "{what}: the whole flood was written");
    assert!(flood.cpu_ticks < ticks_per_second, "{what}: {} CPU ticks", flood.cpu_ticks);
}

/// One connection flooding WINDOW_UPDATE(+1) on the connection, the issue's attack: h2 answers
/// each and would spend a core on it for as long as it lasts; the proxy sends GOAWAY
/// ENHANCE_YOUR_CALM once the frames that carry no request outrun their budget, and logs it.
#[tokio::test]
async fn http2_window_update_flood_gets_goaway_enhance_your_calm() {
    let (logs, _guard) = capture_logs("warn");
    let (proxy, up) = proxy_with(|_| {}).await;
    let flood = flood(proxy.addr(), &h2_frame(0x8, 0, 0, &1u32.to_be_bytes())).await;
    eprintln!("WINDOW_UPDATE flood: {} frames written, {} CPU ticks", flood.written, flood.cpu_ticks);
    assert_cut("WINDOW_UPDATE", &flood);
    assert_eq!(up.hits.load(Ordering::Relaxed), 0);
    // The connection still works for others.
    let mut h2 = H2::connect(proxy.addr()).await;
    assert_eq!(h2.get("svc", "/").await.status, StatusCode::OK);
    drop(proxy);
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("flooded") && warnings[0].contains("control frames"), "{text}");
}

/// PRIORITY frames (h2 reads and ignores them) on an idle stream: the same budget.
#[tokio::test]
async fn http2_priority_flood_gets_goaway_enhance_your_calm() {
    let (proxy, _up) = proxy_with(|_| {}).await;
    // Stream 1 depends on stream 0, weight 16.
    let flood = flood(proxy.addr(), &h2_frame(0x2, 0, 1, &[0, 0, 0, 0, 15])).await;
    eprintln!("PRIORITY flood: {} frames written, {} CPU ticks", flood.written, flood.cpu_ticks);
    assert_cut("PRIORITY", &flood);
}

/// A big download through a small window makes a client send far more WINDOW_UPDATEs than the
/// budget's burst (one per half window, on the stream and on the connection); the DATA frames
/// the proxy sends earn them, so 20 MB arrive whole.
#[tokio::test]
async fn a_20_mb_http2_download_through_a_small_window_is_not_cut() {
    const SIZE: usize = 20 * 1024 * 1024;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req| async {
                let body = http_body_util::Full::new(bytes::Bytes::from(vec![b'z'; SIZE]));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    let proxy = proxy_to(origin, |_| {}).await;
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    // Small WINDOW_UPDATEs must not wait for delayed ACKs (Nagle): 40 ms per round trip.
    stream.set_nodelay(true).unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(16 * 1024)
        .handshake::<_, bytes::Bytes>(stream)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut client = within("h2 ready", client.ready()).await.unwrap();
    let (res, _) = client.send_request(http::Request::get("http://svc/big").body(()).unwrap(), true).unwrap();
    let received = within("20 MB", async {
        let mut body = res.await.unwrap().into_body();
        let mut received = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("the download is not cut");
            received += chunk.len();
            body.flow_control().release_capacity(chunk.len()).unwrap();
        }
        received
    })
    .await;
    assert_eq!(received, SIZE);
    assert!(!conn.is_finished(), "the connection is still open");
}
