//! Resilience policies against upstreams the tests control (failing every n-th request,
//! hanging, resetting): fault injection, retries with their budget, per-try and route timeouts,
//! mirroring, connection-pool limits, outlier ejection and consistent hashing.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::support::*;

/// One service `svc` on port 80 with `endpoints`, a DestinationRule-like `policy` (YAML flow
/// map, may be empty) and one route to itself with `route` fields added.
fn config(endpoints: &[SocketAddr], policy: &str, route: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| format!("{{address: \"{a}\"}}")).collect();
    let policy = if policy.is_empty() { String::new() } else { format!("trafficPolicy: {policy}") };
    format!(
        r#"
version: v1
services:
  - name: svc
    ports: [{{number: 80, endpoints: [{eps}]}}]
    {policy}
    httpRoutes:
      - name: r
        route: [{{destination: {{host: svc}}}}]
        {route}
"#,
        eps = eps.join(", ")
    )
}

/// Sends `n` GETs over `conns` parallel keep-alive connections; the replies in any order.
async fn load(proxy: &TestProxy, n: usize, conns: usize, path: &'static str) -> Vec<Reply> {
    let addr = proxy.addr();
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let share = n / conns + usize::from(i < n % conns);
            tokio::spawn(async move {
                let mut c = H1::connect(addr).await;
                let mut out = Vec::with_capacity(share);
                for _ in 0..share {
                    out.push(c.get("svc", path).await);
                }
                out
            })
        })
        .collect();
    // A bound for the whole loop that a debug build on a busy machine still meets.
    let all = async {
        let mut replies = Vec::with_capacity(n);
        for t in tasks {
            replies.extend(t.await.unwrap());
        }
        replies
    };
    tokio::time::timeout(Duration::from_secs(120), all).await.expect("load finished in time")
}

fn ok_count(replies: &[Reply]) -> usize {
    replies.iter().filter(|r| r.status == StatusCode::OK).count()
}

#[tokio::test]
async fn aborts_hit_their_share_and_never_reach_the_upstream() {
    let up = scripted(|_| Act::Status(200)).await;
    let proxy = TestProxy::start(&config(
        &[up.addr],
        "",
        "fault: {abortHttpStatus: 503, abortPercent: 25}\n        retries: {attempts: 3, retryOn: 5xx}",
    ))
    .await;
    let n = 10_000;
    let replies = load(&proxy, n, 8, "/").await;
    let aborted: Vec<_> = replies.iter().filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE).collect();
    let share = aborted.len() as f64 / n as f64 * 100.0;
    assert!((23.5..=26.5).contains(&share), "{share:.2}% aborted, want 25 ± 1.5");
    assert_eq!(aborted.len() + ok_count(&replies), n);
    assert_eq!(aborted[0].headers["x-weft-error"], "fault injected");
    assert_eq!(
        up.hits.load(Ordering::Relaxed),
        n - aborted.len(),
        "an abort never touches the upstream, nor is retried"
    );
    let text = metrics(&proxy).await;
    assert_eq!(
        sample(&text, &["weft_requests_total{", "response_code=\"503\"", "response_flags=\"FI\""]),
        Some(aborted.len() as f64)
    );
}

#[tokio::test]
async fn delays_apply_to_their_share_only() {
    let up = scripted(|_| Act::Status(200)).await;
    let proxy =
        TestProxy::start_with(&config(&[up.addr], "", "fault: {delayMs: 300, delayPercent: 50}"), |s| {
            s.access_log = true
        })
        .await;
    let mut proxy = proxy;
    let replies = load(&proxy, 100, 50, "/").await;
    assert_eq!(ok_count(&replies), 100);
    let mut log = proxy.access_log.take().unwrap();
    let (mut delayed, mut fast) = (0, 0);
    for _ in 0..100 {
        let line: serde_json::Value =
            serde_json::from_str(&within("log", log.recv()).await.unwrap()).unwrap();
        let ms = line["duration_ms"].as_f64().unwrap();
        if line["response_flags"] == "DI" {
            assert!(ms >= 300.0, "a delayed request took {ms} ms");
            delayed += 1;
        } else {
            assert!(ms < 300.0, "an undelayed request took {ms} ms");
            fast += 1;
        }
    }
    assert!((25..=75).contains(&delayed), "{delayed} delayed of 100 at 50%");
    assert_eq!(delayed + fast, 100);
}

#[tokio::test]
async fn grpc_aborts_are_trailers_only_statuses() {
    let up = scripted(|_| Act::Status(200)).await;
    let proxy =
        TestProxy::start(&config(&[up.addr], "", "fault: {abortGrpcStatus: 8, abortPercent: 100}")).await;
    let mut c = H2::connect(proxy.addr()).await;
    let req = Request::post("http://svc/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")).boxed_unsync())
        .unwrap();
    let reply = c.send(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    assert_eq!(reply.headers["content-type"], "application/grpc");
    assert_eq!(up.hits.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn retries_absorb_one_failure_in_three_when_the_budget_allows() {
    let up = scripted(|n| if n % 3 == 2 { Act::Status(503) } else { Act::Status(200) }).await;
    let proxy = TestProxy::start(&config(
        &[up.addr],
        "{retryBudget: {percent: 100, minRetriesPerSecond: 10}}",
        "retries: {attempts: 3, retryOn: \"gateway-error\", backoffMs: 1}",
    ))
    .await;
    // One connection: the try after a failure is the next hit, which succeeds.
    let n = 3000;
    let replies = load(&proxy, n, 1, "/").await;
    let ok = ok_count(&replies);
    assert!(ok as f64 >= 0.999 * n as f64, "{ok} of {n} succeeded");
    let text = metrics(&proxy).await;
    let sent = sample(&text, &["weft_retries_total{", "result=\"sent\""]).unwrap();
    // A third of all tries fail and each is retried: retries = (requests + retries) / 3.
    assert!((1400.0..=1600.0).contains(&sent), "about one retry per two requests, got {sent}");
}

#[tokio::test]
async fn the_default_budget_lets_success_rise_by_what_it_allows_and_no_more() {
    let up = scripted(|n| if n % 3 == 2 { Act::Status(503) } else { Act::Status(200) }).await;
    let proxy =
        TestProxy::start(&config(&[up.addr], "", "retries: {attempts: 3, retryOn: 5xx, backoffMs: 1}")).await;
    let n = 3000;
    let replies = load(&proxy, n, 4, "/").await;
    let ok = ok_count(&replies) as f64;
    let text = metrics(&proxy).await;
    let sent = sample(&text, &["weft_retries_total{", "result=\"sent\""]).unwrap();
    let exhausted = sample(&text, &["weft_retries_total{", "result=\"budget_exhausted\""]).unwrap();
    // 20% of the requests plus 3 per second over the 10 s window (the test takes less).
    assert!(sent <= 0.2 * n as f64 + 30.0, "{sent} retries");
    assert!(sent >= 0.15 * n as f64, "the budget was used: {sent}");
    assert!(exhausted > 0.0);
    // Without retries a third fail; every success beyond that came from a retry.
    let baseline = (n as f64 * 2.0 / 3.0).floor();
    assert!(ok > baseline + 0.5 * sent, "{ok} ok with {sent} retries");
    assert!(ok <= baseline + sent + 1.0, "{ok} ok with {sent} retries");
}

#[tokio::test]
async fn a_total_outage_costs_at_most_the_budget() {
    let up = scripted(|_| Act::Status(503)).await;
    let proxy =
        TestProxy::start(&config(&[up.addr], "", "retries: {attempts: 3, retryOn: 5xx, backoffMs: 1}")).await;
    let n = 1000;
    let replies = load(&proxy, n, 4, "/").await;
    assert_eq!(ok_count(&replies), 0);
    let attempts = up.hits.load(Ordering::Relaxed) as f64;
    assert!(attempts <= 1.2 * n as f64 + 30.0, "{attempts} attempts for {n} requests");
    let last = &replies[0];
    assert_eq!(last.status, StatusCode::SERVICE_UNAVAILABLE);
    let text = metrics(&proxy).await;
    assert!(
        sample(&text, &["weft_requests_total{", "response_code=\"503\"", "response_flags=\"URX\""]).unwrap()
            > 0.0,
        "answers after a refused retry say URX: {text}"
    );
}

#[tokio::test]
async fn the_route_timeout_cuts_a_retry_sequence() {
    let up = scripted(|_| Act::Delay(Duration::from_secs(5), 200)).await;
    let proxy = TestProxy::start(&config(
        &[up.addr],
        "",
        "timeoutMs: 350\n        retries: {attempts: 10, perTryTimeoutMs: 100, retryOn: reset, backoffMs: 1}",
    ))
    .await;
    let started = Instant::now();
    let reply = H1::connect(proxy.addr()).await.get("svc", "/").await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.headers["x-weft-error"], "upstream request timeout");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
    let hits = up.hits.load(Ordering::Relaxed);
    assert!((2..=4).contains(&hits), "per-try timeouts of 100 ms within 350 ms: {hits} tries");
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint_with_the_same_body() {
    let bad = scripted(|_| Act::Reset).await;
    let good = scripted(|_| Act::Status(200)).await;
    let proxy = TestProxy::start(&config(
        &[bad.addr, good.addr],
        "{loadBalancer: {policy: ROUND_ROBIN}}",
        "retries: {attempts: 1, retryOn: reset, backoffMs: 1}",
    ))
    .await;
    let mut c = H1::connect(proxy.addr()).await;
    for i in 0..10 {
        let body = Bytes::from(format!("payload {i}"));
        let reply = c.send(req("svc", "/").method("POST").body(Full::new(body.clone())).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        assert_eq!(good.seen.lock().unwrap().last().unwrap().1, body, "the retry carried the body");
    }
    assert!(bad.hits.load(Ordering::Relaxed) >= 1);
    assert_eq!(good.hits.load(Ordering::Relaxed), 10);
}

#[tokio::test]
async fn without_a_retry_policy_connect_failures_are_retried_once() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap() // closed when dropped: connections are refused
    };
    let good = scripted(|_| Act::Status(200)).await;
    let proxy =
        TestProxy::start(&config(&[dead, good.addr], "{loadBalancer: {policy: ROUND_ROBIN}}", "")).await;
    let replies = load(&proxy, 20, 1, "/").await;
    assert_eq!(ok_count(&replies), 20, "each refused connection was retried on the other endpoint");

    // A failure that may have reached the app is not retried by default.
    let resets = scripted(|n| if n == 0 { Act::Reset } else { Act::Status(200) }).await;
    proxy.write_config(&config(&[resets.addr], "", "")).await.unwrap();
    let reply = H1::connect(proxy.addr()).await.get("svc", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(resets.hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn outliers_are_ejected_then_return() {
    let bad = scripted(|_| Act::Status(500)).await;
    let good = scripted(|_| Act::Status(200)).await;
    let proxy = TestProxy::start(&config(
        &[bad.addr, good.addr],
        "{loadBalancer: {policy: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 3, baseEjectionTimeMs: 700, maxEjectionPercent: 50}}",
        "retries: {attempts: 0}",
    ))
    .await;
    // Round robin: every other request goes to the bad endpoint until its third failure.
    let replies = load(&proxy, 6, 1, "/").await;
    assert_eq!(bad.hits.load(Ordering::Relaxed), 3);
    assert_eq!(ok_count(&replies), 3);
    let replies = load(&proxy, 20, 1, "/").await;
    assert_eq!(ok_count(&replies), 20, "ejected: everything goes to the good endpoint");
    assert_eq!(bad.hits.load(Ordering::Relaxed), 3);
    let text = metrics(&proxy).await;
    assert_eq!(sample(&text, &["weft_outlier_ejections_total{", "cluster=\"svc||80\""]), Some(1.0));
    assert_eq!(sample(&text, &["weft_outlier_ejected_endpoints{", "cluster=\"svc||80\""]), Some(1.0));

    // The gauge drops when the ejection ends: then the endpoint is balanced again.
    within("ejection ends", async {
        while sample(&metrics(&proxy).await, &["weft_outlier_ejected_endpoints{"]) != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    load(&proxy, 4, 1, "/").await;
    assert!(bad.hits.load(Ordering::Relaxed) > 3, "back in balancing after its time");
}

#[tokio::test]
async fn a_dead_mirror_never_touches_the_primary() {
    let primary = scripted(|_| Act::Status(200)).await;
    let shadow = scripted(|_| Act::Status(200)).await;
    let hanging = scripted(|_| Act::Delay(Duration::from_secs(60), 200)).await;
    let yaml = |mirror: SocketAddr| {
        format!(
            r#"
version: v1
services:
  - name: svc
    ports: [{{number: 80, endpoints: [{{address: "{}"}}]}}]
    httpRoutes:
      - route: [{{destination: {{host: svc}}}}]
        mirror: {{host: shadow}}
        mirrorPercent: 100
  - name: shadow
    ports: [{{number: 80, endpoints: [{{address: "{mirror}"}}]}}]
"#,
            primary.addr
        )
    };
    let proxy = TestProxy::start(&yaml(shadow.addr)).await;
    let mut c = H1::connect(proxy.addr()).await;
    let reply = c
        .send(req("svc:80", "/m").method("POST").body(Full::new(Bytes::from_static(b"copy me"))).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    within("the copy arrives", async {
        while shadow.hits.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let (authority, body) = shadow.seen.lock().unwrap()[0].clone();
    assert_eq!(authority, "svc-shadow:80");
    assert_eq!(body, "copy me");

    // A mirror that never answers: the primary stays fast and fully OK.
    proxy.write_config(&yaml(hanging.addr)).await.unwrap();
    let started = Instant::now();
    let replies = load(&proxy, 200, 4, "/").await;
    assert_eq!(ok_count(&replies), 200);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let text = metrics(&proxy).await;
    let dropped = sample(&text, &["weft_mirror_requests_total{", "result=\"dropped\""]).unwrap_or(0.0);
    assert!(dropped >= 200.0 - 64.0, "copies beyond the in-flight cap are dropped: {dropped}");
}

#[tokio::test]
async fn pool_overflow_is_answered_at_once() {
    let up = scripted(|_| Act::Delay(Duration::from_millis(500), 200)).await;
    let proxy = TestProxy::start(&config(&[up.addr], "{connectionPool: {maxRequests: 1}}", "")).await;
    let addr = proxy.addr();
    let first = tokio::spawn(async move { H1::connect(addr).await.get("svc", "/").await });
    within("first request in flight", async {
        while up.hits.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let started = Instant::now();
    let over = H1::connect(addr).await.get("svc", "/").await;
    assert_eq!(over.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(over.headers["x-weft-error"].to_str().unwrap().starts_with("upstream overflow"));
    assert!(started.elapsed() < Duration::from_millis(300), "not queued: {:?}", started.elapsed());
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let text = metrics(&proxy).await;
    assert_eq!(sample(&text, &["weft_pool_overflows_total{", "result=\"max_requests\""]), Some(1.0));
    assert_eq!(sample(&text, &["response_code=\"503\"", "response_flags=\"UO\""]), Some(1.0));
}

#[tokio::test]
async fn http1_connections_are_capped_and_waiters_bounded() {
    let up = scripted(|_| Act::Delay(Duration::from_millis(300), 200)).await;
    let proxy = TestProxy::start(&config(
        &[up.addr],
        "{connectionPool: {maxConnections: 1, maxPendingRequests: 1}}",
        "retries: {attempts: 0}",
    ))
    .await;
    let replies = load(&proxy, 3, 3, "/").await;
    let mut statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503], "one in flight, one waiting, one over the limit");
    let text = metrics(&proxy).await;
    assert_eq!(sample(&text, &["weft_pool_overflows_total{", "result=\"max_pending_requests\""]), Some(1.0));
}

#[tokio::test]
async fn connections_close_after_their_request_quota() {
    let up = scripted(|_| Act::Status(200)).await;
    let proxy =
        TestProxy::start(&config(&[up.addr], "{connectionPool: {maxRequestsPerConnection: 2}}", "")).await;
    assert_eq!(ok_count(&load(&proxy, 6, 1, "/").await), 6);
    assert_eq!(up.connections.load(Ordering::Relaxed), 3, "two requests per upstream connection");
}

#[tokio::test]
async fn consistent_hashing_keeps_a_key_on_one_endpoint() {
    let ups = [
        scripted(|_| Act::Status(200)).await,
        scripted(|_| Act::Status(200)).await,
        scripted(|_| Act::Status(200)).await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let proxy =
        TestProxy::start(&config(&addrs, "{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}", ""))
            .await;
    let mut c = H1::connect(proxy.addr()).await;
    let mut homes = std::collections::BTreeSet::new();
    for user in 0..60 {
        let before: Vec<usize> = ups.iter().map(|u| u.hits.load(Ordering::Relaxed)).collect();
        for _ in 0..3 {
            let r = c
                .send(req("svc", "/").header("x-user", format!("u{user}")).body(Full::default()).unwrap())
                .await;
            assert_eq!(r.status, StatusCode::OK);
        }
        let got: Vec<usize> =
            ups.iter().zip(&before).map(|(u, b)| u.hits.load(Ordering::Relaxed) - b).collect();
        let home = got.iter().position(|&n| n == 3).unwrap_or_else(|| panic!("user {user} spread: {got:?}"));
        homes.insert(home);
    }
    assert_eq!(homes.len(), 3, "keys spread over the endpoints");
}

#[tokio::test]
async fn opaque_tcp_tries_another_endpoint_when_a_connect_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let echo = half_close_echo().await;
    let yaml = format!(
        "services:\n  - name: db\n    ports: [{{number: 9000, protocol: TCP, endpoints: [{{address: \"{dead}\"}}, {{address: \"{echo}\"}}]}}]\n    trafficPolicy: {{loadBalancer: {{policy: ROUND_ROBIN}}}}\n"
    );
    let proxy = TestProxy::start_with(&yaml, |s| {
        s.explicit = vec![weft_proxy::settings::ExplicitListener {
            addr: "127.0.0.1:0".parse().unwrap(),
            target: Some(("db".into(), 9000)),
        }];
    })
    .await;
    for i in 0..6 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(format!("n{i}").as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        within("the echo answers", s.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, format!("got:n{i}").as_bytes(), "connection {i}");
    }
}
