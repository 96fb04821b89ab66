//! The app's own health probes, run by the proxy for the kubelet.
//!
//! Under PeerAuthentication `STRICT` the inbound listener refuses plain text, and the kubelet's
//! probes of the app come from the node in plain text. So the injector points the app's HTTP
//! and TCP probes at the admin port (never redirected), at `/app-health/<container>/<kind>`
//! (`readyz`, `livez`, `startupz`), and hands the proxy the original probes in
//! `WEFT_APP_PROBES` (`--app-probes`). The admin server answers such a path by running the
//! original probe against the app on `--inbound-forward-ip` and the original port: the proxy's
//! own connections (its UID) are never redirected, so they reach the app directly.
//!
//! `WEFT_APP_PROBES` is a JSON object from each admin path to the probe it stands for:
//!
//! ```json
//! {"/app-health/web/readyz": {"port": 8080, "path": "/healthz?full=1", "headers": [["x-probe", "ready"]], "timeoutSeconds": 2},
//!  "/app-health/web/startupz": {"port": 8080, "tcp": true}}
//! ```
//!
//! - `port` (required): the app's port, 1-65535.
//! - `path`: an HTTP probe's request target, with its query (default `/`).
//! - `headers`: an HTTP probe's headers, as `[name, value]` pairs in order. A `Host` header
//!   replaces the default `Host: <forward-ip>:<port>`.
//! - `tcp: true`: a TCP probe: only a connection is opened (no `path` or `headers` then).
//! - `timeoutSeconds`: how long the proxy waits for the app (the probe's own `timeoutSeconds`,
//!   which the kubelet keeps on the rewritten probe); [`DEFAULT_TIMEOUT`] without it.
//!
//! Unknown fields and malformed entries fail startup, naming the variable and the entry.
//!
//! Pure: the map ([`AppProbes::parse`]), the lookup and the request to send
//! ([`AppHealth::lookup`]), the answer ([`answer`]). I/O: [`Run::run`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header, uri::PathAndQuery};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// The environment variable (and `--app-probes` flag) holding the map.
pub const ENV: &str = "WEFT_APP_PROBES";
/// Admin paths under this prefix are app probes.
pub const PREFIX: &str = "/app-health/";
/// How long the proxy waits for the app when the probe names no timeout. The kubelet's default
/// `timeoutSeconds` is 1 s, and it gives up on the rewritten probe at its own timeout anyway:
/// this only bounds the work behind an answer nobody waits for any more.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The app's probes by admin path (`/app-health/<container>/<kind>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppProbes(BTreeMap<String, AppProbe>);

/// One original probe of the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppProbe {
    /// The app's port (on `--inbound-forward-ip`).
    pub port: u16,
    pub check: Check,
    /// How long the app gets to answer (connect included).
    pub timeout: Duration,
}

/// What the probe does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// `GET path` over HTTP/1.1 with these headers; the app's status is the answer.
    Http { path: PathAndQuery, headers: Vec<(HeaderName, HeaderValue)> },
    /// A TCP connection opens, or not.
    Tcp,
}

/// `WEFT_APP_PROBES` could not be used; the message names the variable and the entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{ENV} (--app-probes) is invalid: {0}")]
pub struct ParseError(String);

/// An entry as the injector writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    port: u16,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    tcp: bool,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

impl AppProbes {
    /// Parses the JSON map (see the module docs). Empty text is an empty map.
    pub fn parse(json: &str) -> Result<AppProbes, ParseError> {
        if json.trim().is_empty() {
            return Ok(AppProbes::default());
        }
        let entries: BTreeMap<String, Entry> = serde_json::from_str(json)
            .map_err(|e| ParseError(format!("expected a JSON object of app probes: {e}")))?;
        entries
            .into_iter()
            .map(|(key, entry)| {
                let probe = entry.check(&key).map_err(|reason| ParseError(format!("{key:?}: {reason}")))?;
                Ok((key, probe))
            })
            .collect::<Result<_, _>>()
            .map(AppProbes)
    }

    /// The probe behind an admin path, if any.
    pub fn get(&self, path: &str) -> Option<&AppProbe> {
        self.0.get(path)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Entry {
    fn check(self, key: &str) -> Result<AppProbe, String> {
        let rest = key.strip_prefix(PREFIX).ok_or_else(|| format!("the path must start with {PREFIX}"))?;
        if rest.is_empty() || rest.contains(['?', '#']) {
            return Err(format!("the path must be {PREFIX}<container>/<kind>, without a query"));
        }
        if self.port == 0 {
            return Err("port must be 1-65535".to_owned());
        }
        let timeout = match self.timeout_seconds {
            None => DEFAULT_TIMEOUT,
            Some(0) => return Err("timeoutSeconds must be at least 1".to_owned()),
            Some(seconds) => Duration::from_secs(seconds),
        };
        let check = if self.tcp {
            if self.path.is_some() || !self.headers.is_empty() {
                return Err("a TCP probe (\"tcp\": true) takes no path or headers".to_owned());
            }
            Check::Tcp
        } else {
            let path = self.path.unwrap_or_else(|| "/".to_owned());
            let parsed = match path.parse::<PathAndQuery>() {
                Ok(p) if path.starts_with('/') && !path.contains('#') => p,
                _ => return Err(format!("path {path:?} is not a request path such as /healthz?full=1")),
            };
            let headers = self
                .headers
                .into_iter()
                .map(|(name, value)| {
                    let bad = || format!("header {name:?}: {value:?} is not a valid HTTP header");
                    Ok((
                        HeaderName::try_from(name.as_str()).map_err(|_| bad())?,
                        HeaderValue::try_from(value.as_str()).map_err(|_| bad())?,
                    ))
                })
                .collect::<Result<_, String>>()?;
            Check::Http { path: parsed, headers }
        };
        Ok(AppProbe { port: self.port, check, timeout })
    }
}

/// What the admin server needs to answer app probes: the map and where the app listens.
#[derive(Clone, Debug)]
pub struct AppHealth {
    pub probes: AppProbes,
    /// The app's address (`--inbound-forward-ip`), as for inbound traffic.
    pub app_ip: IpAddr,
}

impl Default for AppHealth {
    fn default() -> Self {
        AppHealth { probes: AppProbes::default(), app_ip: [127, 0, 0, 1].into() }
    }
}

/// A probe to run: where, what to send, for how long.
#[derive(Debug)]
pub struct Run {
    pub app: SocketAddr,
    /// `None` for a TCP probe.
    pub request: Option<Request<Empty<Bytes>>>,
    pub timeout: Duration,
}

/// What the app did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered an HTTP probe with this status.
    Answered(StatusCode),
    /// A TCP probe's connection opened.
    Connected,
    /// No answer: connection refused, timeout, or not HTTP. Why, for the response body.
    Failed(String),
}

impl AppHealth {
    pub fn from_settings(settings: &crate::Settings) -> AppHealth {
        AppHealth { probes: settings.app_probes.clone(), app_ip: settings.inbound_forward_ip }
    }

    /// The app probe behind an admin request: `None` when `path` names none (the admin server
    /// answers it as any other path, so unknown `/app-health/...` paths get 404), `Err(405)` for
    /// a method other than GET, else the probe to run. `kubelet` are the request's headers: its
    /// `User-Agent` and `Accept` reach the app unless the probe sets its own, so the app sees
    /// what the kubelet would have sent it.
    pub fn lookup(
        &self,
        method: &Method,
        path: &str,
        kubelet: &HeaderMap,
    ) -> Option<Result<Run, StatusCode>> {
        let probe = self.probes.get(path)?;
        if method != Method::GET {
            return Some(Err(StatusCode::METHOD_NOT_ALLOWED));
        }
        let app = SocketAddr::new(self.app_ip, probe.port);
        let request = match &probe.check {
            Check::Tcp => None,
            Check::Http { path, headers } => Some(request(app, path, headers, kubelet)),
        };
        Some(Ok(Run { app, request, timeout: probe.timeout }))
    }
}

/// The HTTP probe's request: `GET path` with the probe's headers, `Host` from them or else the
/// app's address, the kubelet's `User-Agent` and `Accept` unless the probe sets them, and
/// `Connection: close` (one request per connection, as the kubelet does).
pub fn request(
    app: SocketAddr,
    path: &PathAndQuery,
    headers: &[(HeaderName, HeaderValue)],
    kubelet: &HeaderMap,
) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = http::Uri::from(path.clone());
    let map = req.headers_mut();
    for (name, value) in headers {
        map.append(name.clone(), value.clone());
    }
    if !map.contains_key(header::HOST) {
        let host = HeaderValue::try_from(app.to_string()).expect("a socket address is a valid header value");
        map.insert(header::HOST, host);
    }
    for name in [header::USER_AGENT, header::ACCEPT] {
        if let (false, Some(value)) = (map.contains_key(&name), kubelet.get(&name)) {
            map.insert(name, value.clone());
        }
    }
    map.insert(header::CONNECTION, HeaderValue::from_static("close"));
    req
}

/// The admin server's answer to the kubelet: the app's status as it is (the kubelet counts 200-399
/// as success, the rest as failure), 200 for an open TCP port, and 503 when the app could not be
/// reached or gave no usable answer (a 1xx). The body is a short line of ours, never the app's:
/// the admin port is not behind mTLS, so nothing the app says is copied there.
pub fn answer(outcome: &Outcome) -> (StatusCode, String) {
    match outcome {
        Outcome::Answered(status) if (200..600).contains(&status.as_u16()) => {
            (*status, format!("app answered {}\n", status.as_u16()))
        }
        Outcome::Answered(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app answered {}, not a final status\n", status.as_u16()),
        ),
        Outcome::Connected => (StatusCode::OK, "app port open\n".to_owned()),
        Outcome::Failed(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("app probe failed: {why}\n")),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Run {
    /// Runs the probe against the app, within its timeout.
    pub async fn run(self) -> Outcome {
        let Run { app, request, timeout } = self;
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(app).await?;
            let Some(request) = request else { return Ok::<_, BoxError>(Outcome::Connected) };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let mut conn = std::pin::pin!(conn);
            let mut response = std::pin::pin!(sender.send_request(request));
            // Drive the connection only until the response head: the body is never read. The
            // connection may end (`Connection: close`) in the same poll the head arrives, so its
            // end is followed by the response, or by why there was none.
            let response = tokio::select! {
                biased;
                response = &mut response => response?,
                closed = &mut conn => {
                    closed?;
                    response.await?
                }
            };
            Ok(Outcome::Answered(response.status()))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => Outcome::Failed(format!("{app}: {error}")),
            Err(_) => Outcome::Failed(format!("{app}: no answer within {timeout:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map as the injector writes it (webhook/tests/inject.rs checks it writes exactly this).
    const INJECTED: &str = r#"{"/app-health/web/livez":{"port":8080,"path":"/livez","headers":[["Host","web.example"]]},"/app-health/web/readyz":{"port":8080,"path":"/healthz?full=1","headers":[["X-Probe","ready"],["X-Probe","again"]],"timeoutSeconds":2},"/app-health/web/startupz":{"port":8080,"tcp":true}}"#;

    fn health(json: &str) -> AppHealth {
        AppHealth { probes: AppProbes::parse(json).unwrap(), app_ip: [127, 0, 0, 1].into() }
    }

    #[test]
    fn parses_the_injected_map() {
        let probes = AppProbes::parse(INJECTED).unwrap();
        assert_eq!(probes.len(), 3);
        assert_eq!(
            probes.get("/app-health/web/readyz"),
            Some(&AppProbe {
                port: 8080,
                check: Check::Http {
                    path: PathAndQuery::from_static("/healthz?full=1"),
                    headers: vec![
                        (HeaderName::from_static("x-probe"), HeaderValue::from_static("ready")),
                        (HeaderName::from_static("x-probe"), HeaderValue::from_static("again")),
                    ],
                },
                timeout: Duration::from_secs(2),
            })
        );
        assert_eq!(
            probes.get("/app-health/web/startupz"),
            Some(&AppProbe { port: 8080, check: Check::Tcp, timeout: DEFAULT_TIMEOUT })
        );
        assert_eq!(probes.get("/app-health/web/nope"), None);
        assert_eq!(probes.get("/app-health/web/readyz/"), None, "paths match exactly");
        // No path means `/`, as the kubelet does; empty text means no probes.
        let bare = AppProbes::parse(r#"{"/app-health/a/livez":{"port":80}}"#).unwrap();
        let Check::Http { path, headers } = &bare.get("/app-health/a/livez").unwrap().check else { panic!() };
        assert_eq!((path.as_str(), headers.len()), ("/", 0));
        assert!(AppProbes::parse("").unwrap().is_empty());
        assert!(AppProbes::parse("  ").unwrap().is_empty());
        assert!(AppProbes::parse("{}").unwrap().is_empty());
    }

    #[test]
    fn a_bad_map_is_an_error_naming_the_variable_and_the_entry() {
        for (json, says) in [
            ("{nope", "expected a JSON object"),
            ("[]", "expected a JSON object"),
            (r#"{"/app-health/a/livez":{"port":70000}}"#, "expected u16"),
            (r#"{"/app-health/a/livez":{"port":0}}"#, "\"/app-health/a/livez\": port must be 1-65535"),
            (r#"{"/app-health/a/livez":{}}"#, "missing field `port`"),
            (r#"{"/app-health/a/livez":{"port":80,"scheme":"HTTPS"}}"#, "unknown field `scheme`"),
            (r#"{"/healthz":{"port":80}}"#, "\"/healthz\": the path must start with /app-health/"),
            (r#"{"/app-health/a/livez?x":{"port":80}}"#, "without a query"),
            (
                r#"{"/app-health/a/livez":{"port":80,"path":"healthz"}}"#,
                "path \"healthz\" is not a request path",
            ),
            (r#"{"/app-health/a/livez":{"port":80,"path":"/a b"}}"#, "is not a request path"),
            (r#"{"/app-health/a/livez":{"port":80,"headers":[["bad name","x"]]}}"#, "header \"bad name\""),
            (r#"{"/app-health/a/livez":{"port":80,"headers":[["x","a\nb"]]}}"#, "is not a valid HTTP header"),
            (r#"{"/app-health/a/livez":{"port":80,"tcp":true,"path":"/"}}"#, "takes no path or headers"),
            (r#"{"/app-health/a/livez":{"port":80,"timeoutSeconds":0}}"#, "at least 1"),
        ] {
            let error = AppProbes::parse(json).unwrap_err().to_string();
            assert!(error.starts_with("WEFT_APP_PROBES (--app-probes) is invalid: "), "{json}: {error}");
            assert!(error.contains(says), "{json}: {error}");
        }
    }

    #[test]
    fn lookup_builds_the_original_request_for_known_paths_only() {
        let health = health(INJECTED);
        let none = HeaderMap::new();
        assert!(health.lookup(&Method::GET, "/app-health/web/nope", &none).is_none());
        assert!(health.lookup(&Method::GET, "/ready", &none).is_none());
        let post = health.lookup(&Method::POST, "/app-health/web/readyz", &none).unwrap();
        assert_eq!(post.unwrap_err(), StatusCode::METHOD_NOT_ALLOWED);

        let tcp = health.lookup(&Method::GET, "/app-health/web/startupz", &none).unwrap().unwrap();
        assert_eq!((tcp.app, tcp.request.is_none()), ("127.0.0.1:8080".parse().unwrap(), true));

        let mut kubelet = HeaderMap::new();
        kubelet.insert(header::USER_AGENT, HeaderValue::from_static("kube-probe/1.34"));
        kubelet.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        kubelet.insert("x-other", HeaderValue::from_static("not forwarded"));
        let run = health.lookup(&Method::GET, "/app-health/web/readyz", &kubelet).unwrap().unwrap();
        assert_eq!(run.timeout, Duration::from_secs(2));
        let req = run.request.unwrap();
        assert_eq!((req.method(), req.uri().to_string().as_str()), (&Method::GET, "/healthz?full=1"));
        let headers: Vec<_> = req.headers().iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(
            headers,
            [
                ("x-probe", "ready"),
                ("x-probe", "again"),
                ("host", "127.0.0.1:8080"),
                ("user-agent", "kube-probe/1.34"),
                ("accept", "*/*"),
                ("connection", "close"),
            ]
        );
    }

    #[test]
    fn the_probe_host_header_and_user_agent_win() {
        let app: SocketAddr = "[::1]:9000".parse().unwrap();
        let path = PathAndQuery::from_static("/");
        let mut kubelet = HeaderMap::new();
        kubelet.insert(header::USER_AGENT, HeaderValue::from_static("kube-probe/1.34"));
        let req = request(app, &path, &[], &kubelet);
        assert_eq!(req.headers()[header::HOST], "[::1]:9000");
        let own = [
            (header::HOST, HeaderValue::from_static("web.example")),
            (header::USER_AGENT, HeaderValue::from_static("mine")),
        ];
        let req = request(app, &path, &own, &kubelet);
        assert_eq!(req.headers().get_all(header::HOST).iter().collect::<Vec<_>>(), ["web.example"]);
        assert_eq!(req.headers().get_all(header::USER_AGENT).iter().collect::<Vec<_>>(), ["mine"]);
    }

    #[test]
    fn answers_keep_the_app_status_and_fail_closed() {
        let status = |outcome| answer(&outcome).0.as_u16();
        for code in [200, 204, 302, 399, 400, 404, 500, 503] {
            assert_eq!(status(Outcome::Answered(StatusCode::from_u16(code).unwrap())), code);
        }
        assert_eq!(status(Outcome::Answered(StatusCode::SWITCHING_PROTOCOLS)), 503);
        assert_eq!(status(Outcome::Connected), 200);
        let (code, body) = answer(&Outcome::Failed("127.0.0.1:1: Connection refused".into()));
        assert_eq!(
            (code.as_u16(), body.as_str()),
            (503, "app probe failed: 127.0.0.1:1: Connection refused\n")
        );
    }
}
