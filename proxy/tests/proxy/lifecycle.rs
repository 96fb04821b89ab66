//! Drain on shutdown, trace context and request ids, idle connections (pooled upstream ones
//! reaped, downstream HTTP/1 ones parked between requests).

use std::{sync::atomic::Ordering, time::Duration};

use http::StatusCode;
use http_body_util::Full;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use weft_proxy::settings::ExplicitListener;

use crate::support::*;

/// SIGTERM semantics: in-flight HTTP/1 and HTTP/2 requests finish, HTTP/2 clients get GOAWAY,
/// new connections are refused, and `wait` returns once everything is done.
#[tokio::test]
async fn drain_completes_in_flight_requests_and_refuses_new_ones() {
    let up = slow_backend("slow", Duration::from_millis(300)).await;
    let proxy = TestProxy::start(&format!(
        "services: [{{name: svc, ports: [{{number: 80, endpoints: [{{address: \"{}\"}}]}}]}}]",
        up.addr
    ))
    .await;
    let addr = proxy.addr();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(tokio::spawn(async move { H1::connect(addr).await.get("svc", "/").await.status }));
    }
    let h2 = H2::connect(addr).await;
    for _ in 0..3 {
        let mut c = h2.clone();
        tasks.push(tokio::spawn(async move { c.get("svc", "/").await.status }));
    }
    within("requests in flight", async {
        while up.hits.load(Ordering::Relaxed) < 6 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    proxy.handle.shutdown();
    within("drain starts", async {
        while !proxy.handle.is_draining() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    for t in tasks {
        assert_eq!(within("in-flight request", t).await.unwrap(), StatusCode::OK);
    }
    within("drain completes", proxy.handle.wait()).await;
    // The listener is closed: connecting fails or the connection is closed at once.
    if let Ok(mut s) = TcpStream::connect(addr).await {
        let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n").await;
        let mut buf = [0u8; 1];
        assert_eq!(within("refused", s.read(&mut buf)).await.unwrap_or(0), 0);
    }
    // The HTTP/2 connection was told to go away.
    let mut c = h2.clone();
    assert!(c.send_raw(http::Request::get("http://svc/").body(empty()).unwrap()).await.is_err());
}

#[tokio::test]
async fn drain_gives_up_at_the_deadline() {
    // A TCP connection that never ends keeps drain waiting until the deadline.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (_s, _) = l.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let proxy = TestProxy::start_with(
        &format!("services: [{{name: db, ports: [{{number: 1, protocol: TCP, endpoints: [{{address: \"{upstream}\"}}]}}]}}]"),
        |s| {
            s.explicit = vec![ExplicitListener { addr: "127.0.0.1:0".parse().unwrap(), target: Some(("db".into(), 1)) }];
            s.timeouts.drain = Duration::from_millis(300);
        },
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"x").await.unwrap();
    within("connection tracked", async {
        while !proxy.handle.metrics.encode().contains("weft_tcp_connections_opened_total") {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let started = tokio::time::Instant::now();
    proxy.handle.shutdown();
    within("drain deadline", proxy.handle.wait()).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn trace_context_passes_through_and_request_ids_are_generated() {
    let up = backend("up").await;
    let proxy = TestProxy::start(&format!(
        "services: [{{name: svc, ports: [{{number: 80, endpoints: [{{address: \"{}\"}}]}}]}}]",
        up.addr
    ))
    .await;
    let mut c = H1::connect(proxy.addr()).await;
    let trace = [
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "1"),
    ];
    let mut b = req("svc", "/");
    for (k, v) in trace {
        b = b.header(k, v);
    }
    let seen = c.send(b.body(Full::default()).unwrap()).await.json();
    for (k, v) in trace {
        assert_eq!(seen["headers"][k], v, "{k}");
    }
    let generated = seen["headers"]["x-request-id"].as_str().expect("generated").to_owned();
    assert_eq!(generated.len(), 36);
    let again = c.get("svc", "/").await.json();
    assert_ne!(again["headers"]["x-request-id"], generated.as_str(), "one id per request");
    let kept =
        c.send(req("svc", "/").header("x-request-id", "mine").body(Full::default()).unwrap()).await.json();
    assert_eq!(kept["headers"]["x-request-id"], "mine");
}

/// An origin that answers every request `200 ok` on kept-alive connections and reports each
/// connection the proxy closes.
async fn counting_origin() -> (std::net::SocketAddr, tokio::sync::watch::Receiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed) = tokio::sync::watch::channel(0);
    let closed_tx = std::sync::Arc::new(closed_tx);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                }
                closed_tx.send_modify(|c| *c += 1);
            });
        }
    });
    (addr, closed)
}

#[tokio::test]
async fn a_pooled_upstream_connection_idle_past_its_timeout_closes_without_another_request() {
    let (origin, mut closed) = counting_origin().await;
    let idle = Duration::from_millis(300);
    let proxy = TestProxy::start_with(
        &format!(
            "services: [{{name: svc, ports: [{{number: 80, endpoints: [{{address: \"{origin}\"}}]}}]}}]"
        ),
        |s| s.timeouts.upstream_idle = idle,
    )
    .await;
    let mut client = H1::connect(proxy.addr()).await;
    assert_eq!(client.get("svc", "/").await.status, StatusCode::OK);
    let answered = tokio::time::Instant::now();
    // The pool holds the connection; nothing more is sent to this endpoint, yet it closes.
    within("the idle upstream connection closes", closed.wait_for(|c| *c == 1)).await.unwrap();
    assert!(answered.elapsed() >= idle, "closed before its idle timeout: {:?}", answered.elapsed());
}

const HELLO: &str = "services: [{name: hello, ports: [{number: 80}], httpRoutes: [{directResponse: {status: 200, body: hello}}]}]";

/// Reads one response answered with the `hello` route's body off `s`.
async fn read_hello(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.ends_with(b"hello") {
        let n = within("a response", s.read(&mut buf)).await.unwrap();
        assert!(n > 0, "the proxy closed the connection after: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).unwrap()
}

/// Waits until the proxy's metric sample matching `parts` satisfies `done`.
async fn wait_sample(proxy: &TestProxy, parts: &[&str], done: impl Fn(f64) -> bool) {
    within("the metric", async {
        loop {
            if sample(&metrics(proxy).await, parts).is_some_and(&done) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// An HTTP/1 keep-alive connection idle between requests is parked: hyper lets go of it, its
/// buffers are freed, and the socket stays open. The next request on it is served, including
/// one whose first bytes hyper had already read when it let go.
#[tokio::test]
async fn an_idle_http1_connection_is_parked_and_serves_its_next_requests() {
    let proxy = TestProxy::start_with(HELLO, |s| s.timeouts.http1_park = Duration::from_millis(100)).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n";
    s.write_all(request).await.unwrap();
    let first = read_hello(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(!first.to_ascii_lowercase().contains("connection: close"), "{first}");
    // Parked: hyper let go and the socket waits for bytes without buffers.
    wait_sample(&proxy, &["weft_http1_parks_total"], |n| n == 1.0).await;
    wait_sample(&proxy, &["weft_connections_parked "], |n| n == 1.0).await;

    s.write_all(request).await.unwrap();
    assert!(read_hello(&mut s).await.starts_with("HTTP/1.1 200"));

    // A request answered with the next one's first bytes already read: hyper holds them when
    // the connection parks, and they are replayed to the next hyper connection.
    s.write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\nGET /next HTTP/1.1\r\nho").await.unwrap();
    assert!(read_hello(&mut s).await.starts_with("HTTP/1.1 200"));
    wait_sample(&proxy, &["weft_http1_parks_total"], |n| n == 2.0).await;
    s.write_all(b"st: hello\r\n\r\n").await.unwrap();
    let last = read_hello(&mut s).await;
    assert!(last.starts_with("HTTP/1.1 200"), "the replayed bytes began the request: {last}");
    // A parked connection lets go of its cached metric handles; its later requests count in the
    // same series all the same.
    wait_sample(&proxy, &["weft_requests_total{", "response_code=\"200\""], |n| n == 4.0).await;
}

/// A parked connection still idles out, and one whose client asked to close is closed, not
/// parked.
#[tokio::test]
async fn parked_connections_idle_out_and_connection_close_still_closes() {
    let proxy = TestProxy::start_with(HELLO, |s| {
        s.timeouts.http1_park = Duration::from_millis(50);
        s.timeouts.http_idle = Duration::from_millis(500);
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n").await.unwrap();
    read_hello(&mut s).await;
    wait_sample(&proxy, &["weft_http1_parks_total"], |n| n == 1.0).await;
    let parked = tokio::time::Instant::now();
    let mut rest = Vec::new();
    within("the idle connection closes", s.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    assert!(parked.elapsed() >= Duration::from_millis(400), "closed after {:?}", parked.elapsed());

    let closed =
        raw_exchange(proxy.addr(), b"GET / HTTP/1.1\r\nhost: hello\r\nconnection: close\r\n\r\n").await;
    assert!(closed.starts_with("HTTP/1.1 200") && closed.ends_with("hello"), "{closed}");
}
