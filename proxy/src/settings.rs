//! Runtime settings: listener addresses, timeouts and limits. Parsed once from flags in `main`
//! (see `args`), built directly by tests. Routing data never lives here: it is in the config
//! snapshot (`config`).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

/// Everything the proxy needs besides the routing config.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The config file (YAML or JSON of `weft.proxy.v1.ProxyConfig`); used when
    /// `control_plane` is `None`.
    pub config_path: PathBuf,
    /// Take the config from the operator instead of the file.
    pub control_plane: Option<crate::config::control_plane::ControlPlane>,
    /// How often the file is checked for changes (SIGHUP reloads at once).
    pub config_poll_interval: Duration,
    pub admin_addr: SocketAddr,
    /// Redirected outbound traffic (iptables REDIRECT); `None` disables the listener.
    pub outbound_addr: Option<SocketAddr>,
    /// Redirected inbound traffic; `None` disables the listener.
    pub inbound_addr: Option<SocketAddr>,
    /// Where inbound connections go: the app, on this IP and the original destination port.
    pub inbound_forward_ip: std::net::IpAddr,
    /// The app's own HTTP and TCP probes, which the admin server runs against the app at
    /// `/app-health/...` for the kubelet (`probes`; `WEFT_APP_PROBES` from the injector).
    pub app_probes: crate::probes::AppProbes,
    /// Explicit listeners (tests, benchmarks, gateways).
    pub explicit: Vec<ExplicitListener>,
    /// Explicit inbound listeners: the app's port served without redirection (tests, and hosts
    /// without iptables), with everything the inbound listener does (mesh tunnels, inbound policy).
    pub inbound_explicit: Vec<InboundListener>,
    /// Ports whose traffic is opaque TCP whatever the config says (no protocol detection).
    pub opaque_ports: Vec<u16>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Write one JSON line per request to stdout.
    pub access_log: bool,
    /// Where this proxy's mesh identity comes from; without one, no mTLS is accepted or
    /// originated (and the control plane cannot be reached: it requires TLS).
    pub identity: Option<IdentitySource>,
    /// Who this proxy runs beside, for metric labels (`source_*` outbound, `destination_*`
    /// inbound).
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
}

/// A listener that accepts connections directly rather than by redirection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplicitListener {
    pub addr: SocketAddr,
    /// Treat every connection as if it had been redirected to this `host:port` destination:
    /// opaque TCP goes there, and HTTP goes there unless `Host` names another service. Without it,
    /// HTTP is routed by `Host` alone and anything else is refused.
    pub target: Option<(String, u16)>,
}

/// A listener that accepts connections for the local app's `app_port` directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundListener {
    pub addr: SocketAddr,
    pub app_port: u16,
}

#[derive(Clone, Debug)]
pub struct Limits {
    /// Concurrent downstream connections per listener; more are closed at accept.
    pub max_connections: usize,
    /// HTTP/1 request head (request line and headers) and HTTP/2 header list, in bytes.
    pub max_header_bytes: usize,
    /// Number of request header fields, HTTP/1 and HTTP/2 alike (431 beyond).
    pub max_headers: usize,
    /// Request target (HTTP/1) or `:path` (HTTP/2), in bytes (414 beyond).
    pub max_uri_bytes: usize,
    /// Concurrent HTTP/2 streams per downstream connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams the client may reset before the server accepted them (rapid reset).
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the proxy may reset for protocol errors before it sends GOAWAY.
    pub h2_max_local_error_reset_streams: usize,
}

#[derive(Clone, Debug)]
pub struct Timeouts {
    /// How long to wait for the first bytes before treating a connection as opaque TCP.
    pub detect: Duration,
    /// HTTP/1 request-head read deadline, counted from the head's first byte; also the wait for
    /// the HTTP/2 client preface where it is not detected (`detect::h2_preface`).
    pub header_read: Duration,
    /// The longest the proxy waits for the next bytes of a request body before the upstream has
    /// answered (408 then); time the upstream spends not reading does not count, and gRPC
    /// requests have none. Zero: none.
    pub request_body: Duration,
    /// The least average rate of a request body, in bytes/s over the time the proxy waits for
    /// it, before the upstream has answered: the body may take at most `request_body` plus one
    /// second per this many bytes received (408 beyond). Zero: no minimum.
    pub request_body_min_rate: u32,
    /// Close a downstream HTTP connection with no request in flight and no bytes for this long.
    pub http_idle: Duration,
    /// An HTTP/1 keep-alive connection with no request in flight and no bytes for this long is
    /// parked: hyper's buffers and state are freed until its next bytes. Zero: never parked.
    pub http1_park: Duration,
    /// Close a TCP splice with no bytes in either direction for this long.
    pub tcp_idle: Duration,
    /// Default upstream connect timeout (a service's connection pool may override it).
    pub connect: Duration,
    /// Default idle time of a pooled upstream connection.
    pub upstream_idle: Duration,
    /// On shutdown, how long in-flight requests and connections get to finish.
    pub drain: Duration,
    /// A mesh TLS handshake (ClientHello read and handshake, each) must finish within this.
    pub tls_handshake: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_uri_bytes: 64 * 1024,
            h2_max_concurrent_streams: 100,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            detect: Duration::from_millis(500),
            header_read: Duration::from_secs(10),
            request_body: Duration::from_secs(30),
            request_body_min_rate: 500,
            http_idle: Duration::from_secs(300),
            http1_park: Duration::from_millis(100),
            tcp_idle: Duration::from_secs(3600),
            connect: Duration::from_secs(1),
            upstream_idle: Duration::from_secs(90),
            drain: Duration::from_secs(25),
            tls_handshake: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// Settings for an in-process proxy on loopback (tests, the demo): ephemeral ports, no
    /// redirect listeners, the config file polled every 50 ms.
    pub fn loopback(config_path: PathBuf) -> Self {
        Settings {
            config_path,
            control_plane: None,
            config_poll_interval: Duration::from_millis(50),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            outbound_addr: None,
            inbound_addr: None,
            inbound_forward_ip: [127, 0, 0, 1].into(),
            app_probes: crate::probes::AppProbes::default(),
            explicit: vec![ExplicitListener { addr: SocketAddr::from(([127, 0, 0, 1], 0)), target: None }],
            inbound_explicit: Vec::new(),
            opaque_ports: Vec::new(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            access_log: false,
            identity: None,
            workload: Arc::from(""),
            namespace: Arc::from(""),
        }
    }
}

/// Errors parsing flag values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("invalid duration {0:?}: use a number with a unit, e.g. 500ms, 10s, 5m, 1h")]
    Duration(String),
    #[error("invalid listener {0:?}: use ADDR or ADDR=HOST:PORT, e.g. 127.0.0.1:8080=echo:80")]
    Listener(String),
}

/// Parses `250ms`, `10s`, `5m`, `1h` (a whole number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let err = || ParseError::Duration(s.to_owned());
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(err),
        "h" => n.checked_mul(3600).map(Duration::from_secs).ok_or_else(err),
        _ => Err(err()),
    }
}

/// Parses `ADDR` or `ADDR=HOST:PORT`.
pub fn parse_listener(s: &str) -> Result<ExplicitListener, ParseError> {
    let err = || ParseError::Listener(s.to_owned());
    let (addr, target) = match s.split_once('=') {
        Some((addr, target)) => {
            let (host, port) = target.rsplit_once(':').ok_or_else(err)?;
            if host.is_empty() {
                return Err(err());
            }
            (addr, Some((host.to_ascii_lowercase(), port.parse().map_err(|_| err())?)))
        }
        None => (s, None),
    };
    Ok(ExplicitListener { addr: addr.parse().map_err(|_| err())?, target })
}

/// Parses `ADDR=PORT` (an explicit inbound listener for the app's `PORT`).
pub fn parse_inbound_listener(s: &str) -> Result<InboundListener, ParseError> {
    let err = || ParseError::Listener(s.to_owned());
    let (addr, port) = s.split_once('=').ok_or_else(err)?;
    let app_port = port.parse().ok().filter(|p| *p != 0).ok_or_else(err)?;
    Ok(InboundListener { addr: addr.parse().map_err(|_| err())?, app_port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "10", "s", "1.5s", "-1s", "10 s", "10d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listeners() {
        assert_eq!(
            parse_listener("127.0.0.1:8080"),
            Ok(ExplicitListener { addr: "127.0.0.1:8080".parse().unwrap(), target: None })
        );
        assert_eq!(
            parse_listener("[::1]:9000=Echo.default:80"),
            Ok(ExplicitListener {
                addr: "[::1]:9000".parse().unwrap(),
                target: Some(("echo.default".into(), 80))
            })
        );
        for bad in ["nope", "127.0.0.1:1=echo", "127.0.0.1:1=:80", "127.0.0.1:1=echo:x"] {
            assert!(parse_listener(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_inbound_listener("127.0.0.1:15006=8080"),
            Ok(InboundListener { addr: "127.0.0.1:15006".parse().unwrap(), app_port: 8080 })
        );
        for bad in ["127.0.0.1:15006", "127.0.0.1:15006=0", "127.0.0.1:15006=http", "x=80"] {
            assert!(parse_inbound_listener(bad).is_err(), "{bad:?}");
        }
    }
}

/// Where the proxy's identity comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// Files someone else writes (tests, benchmarks, an external issuer).
    Files(IdentityFiles),
    /// The mesh CA on the control plane (in-cluster proxies).
    Ca(crate::certify::CaClient),
}

/// Where the proxy's credentials live (PEM): written by whatever issues them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The roots peers' certificates must chain to.
    pub trust_bundle: PathBuf,
}

impl IdentityFiles {
    /// Writes `cert.pem`, `key.pem` (owner-only) and `ca.crt` into `dir`, each replaced
    /// atomically, as any writer of a running proxy's credentials must (tests, benchmarks, the
    /// demo).
    pub fn write(
        dir: &std::path::Path,
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> std::io::Result<IdentityFiles> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(dir)?;
        let files = IdentityFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            trust_bundle: dir.join("ca.crt"),
        };
        for (path, content) in
            [(&files.key, key_pem), (&files.cert, cert_pem), (&files.trust_bundle, bundle_pem)]
        {
            let tmp = path.with_extension("tmp");
            let mut file =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            std::io::Write::write_all(&mut file, content.as_bytes())?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(files)
    }
}
