//! h2spec (the HTTP/2 conformance checker, pinned in xtask/tools/h2spec/go.mod and installed
//! by `cargo xtask test`) against the proxy's h2c listeners, in front of each kind of upstream:
//! an HTTP/1.1 origin (the listener detects the protocol, the port declares HTTP1) and an h2c
//! origin (the listener's target port declares HTTP2, so nothing is detected). Every case must
//! pass; a missing h2spec fails the test with the command that installs it.

use std::{path::PathBuf, process::Stdio, sync::atomic::Ordering, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use weft_proxy::settings::ExplicitListener;

use crate::support::*;

/// Must match xtask/src/h2spec.rs (`cargo xtask test` installs this version).
const H2SPEC_VERSION: &str = "v2.2.1";

/// The whole run, bounded: 146 cases (`--strict` includes the SHOULDs), each bounded by h2spec's
/// `--timeout 2`.
const RUN_DEADLINE: Duration = Duration::from_secs(180);

fn h2spec() -> PathBuf {
    let cache = std::env::var_os("WEFT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/weft"));
    let bin = cache.join(format!("h2spec-{H2SPEC_VERSION}/h2spec"));
    assert!(
        bin.is_file(),
        "h2spec is not installed at {}; install it with `cargo xtask h2spec` (or run the tests with \
         `cargo xtask test`, which installs it first)",
        bin.display()
    );
    bin
}

/// Runs h2spec against `addr` and fails with the failing cases unless every case passed.
async fn conformance(what: &str, addr: std::net::SocketAddr) {
    let bin = h2spec();
    let log = std::env::temp_dir().join(format!("weft-h2spec-{}-{}.txt", std::process::id(), addr.port()));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(&bin)
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "--timeout", "2", "--strict"])
        .stdin(Stdio::null())
        // Files, not pipes: nothing reads while it runs.
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("h2spec starts");
    // The proxy runs on this runtime's workers; h2spec is waited for beside them.
    let started = tokio::time::Instant::now();
    while child.try_wait().expect("waiting for h2spec").is_none() {
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            panic!("{what}: h2spec did not finish within {RUN_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = child.wait().unwrap();
    let stdout = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let summary = stdout.lines().rev().find(|l| l.contains(" tests, ")).unwrap_or_default().trim();
    let (passed, failed) = counts(summary);
    let failures = stdout.split_once("Failures:").map_or("", |(_, f)| f.trim());
    eprintln!("{what}: h2spec {summary}");
    assert!(
        status.success() && failed == Some(0) && passed.is_some_and(|p| p > 100),
        "{what}: h2spec {summary:?} ({status})\nfailures:\n{failures}\noutput:\n{stdout}"
    );
}

/// `(passed, failed)` from h2spec's `146 tests, 146 passed, 0 skipped, 0 failed`.
fn counts(summary: &str) -> (Option<u32>, Option<u32>) {
    let count = |word: &str| {
        summary.split(", ").find_map(|part| part.trim().strip_suffix(word)?.trim().parse::<u32>().ok())
    };
    (count("passed"), count("failed"))
}

#[test]
fn h2spec_summary_is_parsed() {
    assert_eq!(counts("145 tests, 144 passed, 0 skipped, 1 failed"), (Some(144), Some(1)));
    assert_eq!(counts(""), (None, None));
}

/// h2c from the client, HTTP/1.1 to the origin: the listener detects HTTP/2 from the preface,
/// the service (found by h2spec's `:authority`, 127.0.0.1) declares HTTP1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2spec_passes_with_an_http1_upstream() {
    let up = backend("h1").await;
    let proxy = TestProxy::start(&format!(
        "services: [{{name: h1, aliases: [\"127.0.0.1\"], ports: [{{number: 80, protocol: HTTP1, \
         endpoints: [{{address: \"{}\"}}]}}]}}]",
        up.addr
    ))
    .await;
    conformance("HTTP/1.1 upstream", proxy.addr()).await;
    assert!(up.hits.load(Ordering::Relaxed) > 0, "requests reached the origin");
}

/// h2c end to end: the listener's target port declares HTTP2, so the proxy serves HTTP/2
/// without detection and speaks h2c to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2spec_passes_with_an_h2c_upstream() {
    let up = backend("h2").await;
    let proxy = h2c_listener(up.addr).await;
    conformance("h2c upstream", proxy.addr()).await;
    assert!(up.hits.load(Ordering::Relaxed) > 0, "requests reached the origin");
}

/// A listener for the service `h2`, whose port declares HTTP2 (no detection, h2c upstream).
async fn h2c_listener(origin: std::net::SocketAddr) -> TestProxy {
    TestProxy::start_with(
        &format!(
            "services: [{{name: h2, ports: [{{number: 80, protocol: HTTP2, \
             endpoints: [{{address: \"{origin}\"}}]}}]}}]"
        ),
        |s| {
            s.explicit = vec![ExplicitListener {
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                target: Some(("h2".into(), 80)),
            }]
        },
    )
    .await
}

/// h2spec http2/3.5/2 without h2spec: an invalid preface (and a frame after it) on a port
/// that declares HTTP2 ends in a clean close, not a reset with the client's bytes unread.
#[tokio::test]
async fn an_invalid_preface_on_a_declared_http2_port_closes_cleanly() {
    let up = backend("h2").await;
    let proxy = h2c_listener(up.addr).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    // The invalid preface, then an empty SETTINGS frame, as h2spec sends them.
    s.write_all(b"INVALID CONNECTION PREFACE\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    let mut out = Vec::new();
    let read = within("the proxy closes", s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "closed with {read:?} after {out:?}");
    assert_eq!(up.connections.load(Ordering::Relaxed), 0, "nothing reached the origin");
    // A valid client on the same listener is served.
    let mut c = H2::connect(proxy.addr()).await;
    assert_eq!(c.get("h2", "/").await.status, http::StatusCode::OK);
}

/// h2spec generic/4/2: HEAD over h2c end to end gets the headers, with the length a GET would
/// have, and no body. (An origin that sends a body with it, as hyper's HTTP/2 server does unless
/// the service leaves it out, gets its stream reset by the proxy's h2 client, and the client a
/// reset too: `support::echo` leaves it out.)
#[tokio::test]
async fn head_over_h2c_both_ways_gets_headers_only() {
    let up = backend("h2").await;
    let proxy = h2c_listener(up.addr).await;
    let mut c = H2::connect(proxy.addr()).await;
    let reply = c.send(http::Request::head("http://h2/").body(empty()).unwrap()).await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert!(reply.body.is_empty(), "{reply:?}");
    assert!(reply.headers.contains_key("content-length"), "{reply:?}");
}
