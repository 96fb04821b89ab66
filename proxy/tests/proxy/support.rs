//! In-process harness: the proxy with a config file in a temp dir, backends and clients on
//! 127.0.0.1 with ephemeral ports. Waits use readiness signals (the store's status channel,
//! bound listeners), never sleeps; every wait has a deadline.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use weft_proxy::{Handle, Settings, http::observe::AccessLog, metrics::Metrics};

pub const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `f` or fails the test after `DEADLINE`.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

pub struct TestProxy {
    pub handle: Handle,
    pub config: PathBuf,
    pub access_log: Option<mpsc::Receiver<String>>,
}

impl TestProxy {
    pub async fn start(yaml: &str) -> TestProxy {
        Self::start_with(yaml, |_| {}).await
    }

    pub async fn start_with(yaml: &str, tweak: impl FnOnce(&mut Settings)) -> TestProxy {
        let dir = std::env::temp_dir().join(format!(
            "weft-proxy-test-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut settings = Settings::loopback(config.clone());
        tweak(&mut settings);
        let metrics = Metrics::new();
        let (tx, rx) = mpsc::channel(10_000);
        let log = settings.access_log.then(|| AccessLog::to_channel(tx));
        let handle = weft_proxy::app::start_with(settings, Default::default(), metrics, log.clone())
            .await
            .expect("proxy starts");
        TestProxy { handle, config, access_log: log.map(|_| rx) }
    }

    /// The first explicit listener.
    pub fn addr(&self) -> SocketAddr {
        self.handle.explicit_addrs[0]
    }

    pub fn version(&self) -> Option<String> {
        self.handle.store.current().map(|s| s.version.clone())
    }

    /// Rewrites the config file (atomically, as a ConfigMap update would) and waits for the
    /// outcome of the next load attempt.
    pub async fn write_config(&self, yaml: &str) -> Result<(), String> {
        let mut status = self.handle.store.subscribe();
        status.borrow_and_update();
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
        within("config reload", status.changed()).await.unwrap();
        match status.borrow().last_error.clone() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// === Backends ===

/// A TCP server that reads until the client half-closes, then answers `got:<bytes>` and closes.
pub async fn half_close_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(b"got:").await.unwrap();
                s.write_all(&buf).await.unwrap();
            });
        }
    });
    addr
}

/// An HTTP backend (HTTP/1.1 and HTTP/2) that answers with a JSON echo of the request:
/// `{"backend", "method", "uri", "version", "headers"}`. `/slow?ms=N` waits first;
/// `/status/N` answers with that status.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
}

pub async fn backend(name: &'static str) -> Backend {
    slow_backend(name, Duration::ZERO).await
}

/// A backend that waits `delay` before every answer.
pub async fn slow_backend(name: &'static str, delay: Duration) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (h, c) = (hits.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            c.fetch_add(1, Ordering::Relaxed);
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(delay).await;
                        echo(name, req).await
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { addr, hits, connections }
}

async fn echo(name: &'static str, mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(ms) =
        path.strip_prefix("/slow").and_then(|_| req.uri().query()?.strip_prefix("ms=")?.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        // Upgrade: answer 101, then echo raw bytes on the upgraded connection.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        res.headers_mut().insert("connection", "upgrade".parse().unwrap());
        res.headers_mut().insert("upgrade", req.headers()["upgrade"].clone());
        return Ok(res);
    }
    let headers: BTreeMap<String, String> =
        req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
    let body = serde_json::json!({
        "backend": name,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "path": req.uri().path_and_query().map(|p| p.as_str()),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let status = path.strip_prefix("/status/").and_then(|s| s.parse().ok()).unwrap_or(200);
    let body = Bytes::from(body.to_string());
    // HEAD: the length a GET would have, and no body. (hyper's HTTP/2 server would send the body
    // of a HEAD response, which the proxy's h2 client rightly treats as a stream error.)
    let head = req.method() == http::Method::HEAD;
    let length = body.len();
    let mut res = Response::new(Full::new(if head { Bytes::new() } else { body }));
    if head {
        res.headers_mut().insert(http::header::CONTENT_LENGTH, length.into());
    }
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut().insert("x-backend", name.parse().unwrap());
    Ok(res)
}

// === Clients ===

/// One HTTP/1.1 keep-alive connection.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        H1 { sender }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Reply {
        within("h1 ready", self.sender.ready()).await.unwrap();
        let res = within("h1 response", self.sender.send_request(req)).await.unwrap();
        Reply::read(res).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Reply {
        self.send(req(host, path).body(Full::default()).unwrap()).await
    }
}

pub fn req(host: &str, path: &str) -> http::request::Builder {
    Request::get(path).header("host", host)
}

/// One HTTP/2 (prior knowledge) connection.
#[derive(Clone)]
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<BoxBody>,
}

pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

impl H2 {
    pub async fn connect(addr: SocketAddr) -> H2 {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        H2 { sender }
    }

    pub async fn send(&mut self, req: Request<BoxBody>) -> Reply {
        within("h2 ready", self.sender.ready()).await.unwrap();
        let res = within("h2 response", self.sender.send_request(req)).await.unwrap();
        Reply::read(res).await
    }

    pub async fn send_raw(&mut self, req: Request<BoxBody>) -> hyper::Result<Response<Incoming>> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }

    pub async fn get(&mut self, authority: &str, path: &str) -> Reply {
        let uri = format!("http://{authority}{path}");
        self.send(Request::get(uri).body(empty()).unwrap()).await
    }
}

pub fn empty() -> BoxBody {
    Full::new(Bytes::new()).boxed_unsync()
}

/// A read response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub async fn read(res: Response<Incoming>) -> Reply {
        let (parts, body) = res.into_parts();
        let collected = within("body", body.collect()).await.expect("body");
        let trailers = collected.trailers().cloned();
        Reply { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn backend(&self) -> String {
        self.json()["backend"].as_str().unwrap_or_default().to_owned()
    }
}

/// A body fed frame by frame from a channel (streaming requests).
pub struct ChannelBody(pub mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// A body made of given frames (data and trailers).
pub struct Frames(pub VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// GETs an admin path.
pub async fn admin(proxy: &TestProxy, method: http::Method, path: &str) -> Reply {
    let mut c = H1::connect(proxy.handle.admin_addr).await;
    c.send(Request::builder().method(method).uri(path).header("host", "admin").body(Full::default()).unwrap())
        .await
}

/// What a scripted backend does with one request.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// Answer with this status after reading the request body.
    Status(u16),
    /// Wait, then answer with the status.
    Delay(Duration, u16),
    /// Close the connection (HTTP/1.1) or reset the stream (HTTP/2) without an answer.
    Reset,
}

/// A backend whose answers `script` decides from the hit number (0-based, across connections);
/// it records each request's `Host` (or `:authority`) and body.
pub struct Scripted {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    /// `(authority, body)` of each request, in arrival order.
    pub seen: Arc<std::sync::Mutex<Vec<(String, Bytes)>>>,
}

pub async fn scripted(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let script = Arc::new(script);
    let (h, c, s) = (hits.clone(), connections.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            c.fetch_add(1, Ordering::Relaxed);
            let (h, s, script) = (h.clone(), s.clone(), script.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let n = h.fetch_add(1, Ordering::Relaxed);
                    let (s, act) = (s.clone(), script(n));
                    async move {
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers().get("host").and_then(|v| v.to_str().ok()).map(str::to_owned)
                            })
                            .unwrap_or_default();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        s.lock().unwrap().push((authority, body));
                        let status = match act {
                            Act::Status(code) => code,
                            Act::Delay(d, code) => {
                                tokio::time::sleep(d).await;
                                code
                            }
                            Act::Reset => return Err("scripted reset"),
                        };
                        let mut res = Response::new(Full::new(Bytes::from(format!("hit {n}"))));
                        *res.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok(res)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Scripted { addr, hits, connections, seen }
}

/// Sends raw bytes and reads until the proxy closes the connection.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = within("proxy closes", s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The proxy's `/metrics` text.
pub async fn metrics(proxy: &TestProxy) -> String {
    String::from_utf8(admin(proxy, http::Method::GET, "/metrics").await.body.to_vec()).unwrap()
}

/// The value of the first sample whose line contains every one of `parts`.
pub fn sample(text: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// An origin that records the raw bytes each connection sends it and never answers: what the
/// proxy forwarded, byte for byte, including requests it cut off.
pub struct RawOrigin {
    pub addr: SocketAddr,
    /// One entry per accepted connection, growing as bytes arrive.
    pub received: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    /// How many connections the proxy has closed; bumped (with the same count) on every read.
    closed: tokio::sync::watch::Receiver<usize>,
}

impl RawOrigin {
    /// Waits until the proxy has closed `n` connections to this origin.
    pub async fn wait_closed(&self, n: usize) {
        let mut closed = self.closed.clone();
        within("the proxy closes its upstream connections", closed.wait_for(|c| *c >= n)).await.unwrap();
    }

    /// Waits until what the connections received satisfies `done`.
    pub async fn wait_received(&self, done: impl Fn(&[Vec<u8>]) -> bool) {
        let mut changed = self.closed.clone();
        within("the origin receives", async {
            while !done(&self.received.lock().unwrap()) {
                changed.changed().await.unwrap();
            }
        })
        .await;
    }

    /// Everything received so far, each connection's bytes as text.
    pub fn requests(&self) -> Vec<String> {
        self.received.lock().unwrap().iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()
    }
}

pub async fn raw_origin() -> RawOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (closed_tx, closed) = tokio::sync::watch::channel(0);
    let closed_tx = Arc::new(closed_tx);
    let r = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (r, closed_tx) = (r.clone(), closed_tx.clone());
            tokio::spawn(async move {
                let slot = {
                    let mut all = r.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    r.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
                    closed_tx.send_modify(|_| {});
                }
                closed_tx.send_modify(|c| *c += 1);
            });
        }
    });
    RawOrigin { addr, received, closed }
}

/// Sends raw bytes (a write the proxy cut short by closing is not an error) and reads until the
/// proxy closes the connection (a reset after the answer is not an error either).
pub async fn raw_exchange_lenient(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        match within("proxy closes", s.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
