//! The `weft-proxy` binary as an operator runs it: every flag documented in `--help`, startup
//! from a config file, SIGHUP reload, SIGTERM drain and exit, idle memory (reported, and held
//! under a budget) and memory after a burst. Spawns the real process because signals and RSS
//! are per process.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_weft-proxy");
const DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--control-plane",
        "--pod-name",
        "--pod-namespace",
        "--destinations",
        "--config-poll",
        "--admin-addr",
        "--outbound-addr",
        "--inbound-addr",
        "--no-redirect",
        "--inbound-forward-ip",
        "--listen",
        "--listen-inbound",
        "--app-probes",
        "--opaque-ports",
        "--detect-timeout",
        "--header-read-timeout",
        "--http-idle-timeout",
        "--http1-park-after",
        "--tcp-idle-timeout",
        "--connect-timeout",
        "--upstream-idle-timeout",
        "--drain-timeout",
        "--max-connections",
        "--max-header-bytes",
        "--max-headers",
        "--max-uri-bytes",
        "--request-body-timeout",
        "--request-body-min-rate",
        "--h2-max-concurrent-streams",
        "--h2-max-pending-resets",
        "--h2-max-local-resets",
        "--access-log",
        "--log-format",
        "--log",
        "--workers",
        "--version",
    ] {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "--help lacks {flag}:\n{help}"
        );
    }
    // Every flag has a description and an environment variable.
    assert!(help.matches("[env: WEFT_").count() >= 25, "{help}");
    assert!(help.contains("init ") && help.contains("wait "), "the commands are listed:\n{help}");
    for (command, flags) in [
        (
            "init",
            &[
                "--proxy-uid",
                "--outbound-port",
                "--inbound-port",
                "--exclude-inbound-ports",
                "--exclude-outbound-ports",
                "--exclude-outbound-cidrs",
                "--dry-run",
            ][..],
        ),
        ("wait", &["--admin", "--timeout"][..]),
    ] {
        let out = Command::new(BIN).args([command, "--help"]).output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        for flag in flags {
            assert!(help.contains(&format!("{flag} ")), "`{command} --help` lacks {flag}:\n{help}");
        }
    }
}

#[test]
fn init_dry_run_prints_the_capture_without_installing_it() {
    let out = Command::new(BIN)
        .args(["init", "--dry-run", "--exclude-inbound-ports=15000", "--exclude-outbound-cidrs=10.0.0.0/8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rules = String::from_utf8(out.stdout).unwrap();
    assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"), "{rules}");
    assert!(rules.contains("-A WEFT_OUTPUT -d 10.0.0.0/8 -j RETURN"), "{rules}");
    let bad = Command::new(BIN)
        .args(["init", "--dry-run", "--exclude-outbound-cidrs=10.0.0.0/33"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("10.0.0.0/33"));
}

/// A running `weft-proxy` whose JSON log lines arrive on a channel.
struct Proxy {
    child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
}

impl Proxy {
    fn start(config: &Path) -> Proxy {
        Proxy::start_with(config, &[])
    }

    fn start_with(config: &Path, flags: &[&str]) -> Proxy {
        let mut child = Command::new(BIN)
            .args(["--config", config.to_str().unwrap()])
            .args(flags)
            .args(["--no-redirect", "--admin-addr", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
            .args(["--config-poll", "1h", "--log-format", "json", "--drain-timeout", "5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Proxy { child, logs }
    }

    /// Waits for a log line whose message is `msg`, returning its fields.
    fn wait_log(&self, msg: &str) -> serde_json::Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = self.logs.recv_timeout(left).unwrap_or_else(|_| panic!("no {msg:?} log line"));
            if line["fields"]["message"] == msg {
                return line["fields"].clone();
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Resident memory the process allocated itself (heap, stacks), without the binary's code
    /// pages, which a node shares between every proxy and which a debug build inflates.
    fn anon_rss_kib(&self) -> u64 {
        self.status_kib("RssAnon:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(addr: SocketAddr, host: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn starts_reloads_on_sighup_drains_on_sigterm_and_idles_small() {
    let dir = std::env::temp_dir().join(format!("weft-proxy-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    let v = |version: &str| {
        format!(
            "version: {version}\nservices:\n  - name: hello\n    ports: [{{number: 80}}]\n    httpRoutes:\n      - directResponse: {{status: 200, body: \"{version}\"}}\n"
        )
    };
    std::fs::write(&config, v("v1")).unwrap();
    let proxy = Proxy::start(&config);
    let started = proxy.wait_log("weft-proxy started");
    let admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
    let listen: SocketAddr =
        started["explicit"].as_str().unwrap().trim_matches(&['[', ']'][..]).parse().unwrap();

    assert!(get(admin, "admin", "/ready").starts_with("HTTP/1.1 200"));
    assert!(get(listen, "hello", "/").ends_with("v1"));

    let (rss, anon) = (proxy.rss_kib(), proxy.anon_rss_kib());
    println!("weft-proxy idle RSS: {rss} KiB, of it allocated by the process: {anon} KiB");
    // Measured: 0.8 MiB in a release build, 2.0 MiB in a debug one. The rest of the RSS is code
    // pages (7.5 MiB release, 17 MiB debug), shared by every proxy on a node and growing with
    // the debug binary, so bounding it here would fail as the code grows, not as memory leaks.
    let budget = 4 * 1024;
    assert!(anon < budget, "idle anonymous RSS {anon} KiB over {budget} KiB");

    // Replace the file atomically, as a ConfigMap update does.
    std::fs::write(config.with_extension("tmp"), v("v2")).unwrap();
    std::fs::rename(config.with_extension("tmp"), &config).unwrap();
    proxy.signal("-HUP");
    let loaded = proxy.wait_log("config loaded");
    assert_eq!(loaded["version"], "v2");
    assert!(get(listen, "hello", "/").ends_with("v2"));

    proxy.signal("-TERM");
    proxy.wait_log("drained");
    let mut proxy = proxy;
    let mut child = std::mem::replace(&mut proxy.child, Command::new("true").spawn().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx.recv_timeout(DEADLINE).expect("exits after SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An origin answering every request with 1 KiB on kept-alive connections.
async fn kilobyte_origin() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n".to_vec();
                answer.resize(answer.len() + 1024, b'x');
                let mut buf = vec![0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && s.write_all(&answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// After a burst of connections closes, RSS falls back toward idle instead of staying at the
/// peak: idle pooled upstream connections are closed without waiting for another request, and
/// the memory they and the downstream connections held goes back to the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_toward_idle_after_a_burst_of_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BURST: usize = 1000;
    let origin = kilobyte_origin().await;
    let dir = std::env::temp_dir().join(format!("weft-proxy-burst-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!("services: [{{name: origin, ports: [{{number: 80, protocol: HTTP1, endpoints: [{{address: \"{origin}\"}}]}}]}}]\n"),
    )
    .unwrap();
    let proxy = Proxy::start_with(&config, &["--upstream-idle-timeout", "1s"]);
    let started = proxy.wait_log("weft-proxy started");
    let listen: SocketAddr =
        started["explicit"].as_str().unwrap().trim_matches(&['[', ']'][..]).parse().unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: origin\r\n\r\n";
    let mut warm = tokio::net::TcpStream::connect(listen).await.unwrap();
    warm.write_all(request).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let _ = warm.read(&mut answer).await.unwrap();
    drop(warm);
    let idle = proxy.anon_rss_kib();

    // All the requests are sent before any answer is read, so the proxy holds them at once and
    // its upstream pool grows with them.
    let mut conns = Vec::with_capacity(BURST);
    for _ in 0..BURST {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(request).await.unwrap();
        conns.push(s);
    }
    for s in &mut conns {
        let mut got = 0;
        while got < 1024 {
            let n = tokio::time::timeout(DEADLINE, s.read(&mut answer)).await.expect("an answer").unwrap();
            assert!(n > 0, "the proxy closed a connection of the burst");
            got += n;
        }
    }
    let peak = proxy.anon_rss_kib();
    // About 8 MiB in a debug build since connections got smaller (it failed a CI run at 7.9 MiB
    // against a bound of 8); half of that is enough to see it given back.
    assert!(peak > idle + 4 * 1024, "the burst should cost memory: idle {idle} KiB, peak {peak} KiB");
    drop(conns);

    let target = idle + (peak - idle) / 4;
    let until = Instant::now() + DEADLINE;
    let mut rss = proxy.anon_rss_kib();
    while rss > target && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = proxy.anon_rss_kib();
    }
    println!("weft-proxy anonymous RSS: idle {idle} KiB, burst of {BURST} {peak} KiB, after {rss} KiB");
    assert!(rss <= target, "RSS stayed at {rss} KiB after the burst (idle {idle} KiB, peak {peak} KiB)");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Idle HTTP/1 keep-alive connections are parked between requests: once each has had its answer
/// and idled past `--http1-park-after`, hyper's buffers and state are freed and the memory the
/// process allocated falls to a few KiB per connection (debug build: ~6 KB parked, ~20 KB
/// not parked; release: ~3 KB of heap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keep_alive_connections_cost_a_few_kib_each() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CONNECTIONS: usize = 1000;
    let dir = std::env::temp_dir().join(format!("weft-proxy-parked-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "services: [{name: hello, ports: [{number: 80}], httpRoutes: [{directResponse: {status: 200, body: hello}}]}]\n",
    )
    .unwrap();
    let proxy = Proxy::start_with(&config, &["--http1-park-after", "100ms"]);
    let started = proxy.wait_log("weft-proxy started");
    let admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
    let listen: SocketAddr =
        started["explicit"].as_str().unwrap().trim_matches(&['[', ']'][..]).parse().unwrap();
    let parked = || {
        let metrics = get(admin, "admin", "/metrics");
        let line = metrics.lines().find(|l| l.starts_with("weft_connections_parked ")).map(str::to_owned);
        line.and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok()).unwrap_or(0)
    };
    let before = proxy.anon_rss_kib();

    let mut conns = Vec::with_capacity(CONNECTIONS);
    let mut answer = vec![0u8; 1024];
    for _ in 0..CONNECTIONS {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"hello") {
            let n = tokio::time::timeout(DEADLINE, s.read(&mut answer)).await.expect("an answer").unwrap();
            assert!(n > 0, "the proxy closed a connection");
            got.extend_from_slice(&answer[..n]);
        }
        conns.push(s);
    }
    let until = Instant::now() + DEADLINE;
    while parked() < CONNECTIONS && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(parked(), CONNECTIONS, "every idle connection parks");
    // Parking frees what hyper held; the release after the burst gives those pages back.
    let per_connection = |rss: u64| (rss.saturating_sub(before) * 1024) as usize / CONNECTIONS;
    let bound = 10 * 1024;
    let mut rss = proxy.anon_rss_kib();
    while per_connection(rss) > bound && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = proxy.anon_rss_kib();
    }
    println!(
        "weft-proxy anonymous RSS: {before} KiB idle, {rss} KiB with {CONNECTIONS} parked connections ({} bytes each)",
        per_connection(rss)
    );
    assert!(per_connection(rss) <= bound, "{} bytes per parked connection", per_connection(rss));
    drop(conns);
    let _ = std::fs::remove_dir_all(&dir);
}
