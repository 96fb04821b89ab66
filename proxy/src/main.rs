//! `weft-proxy`: flags in, `Settings` out, then run until SIGTERM (drain) or `POST /shutdown`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_proxy::{
    certify::CaClient,
    config::control_plane::ControlPlane,
    grpc::host_of,
    settings::{
        ExplicitListener, IdentityFiles, IdentitySource, InboundListener, Limits, Settings, Timeouts,
        parse_duration, parse_inbound_listener, parse_listener,
    },
};

/// Weft's sidecar proxy: forwards HTTP/1.1, HTTP/2, gRPC and opaque TCP with routing, weighted
/// splits and load balancing from a config file (YAML or JSON of weft.proxy.v1.ProxyConfig).
///
/// Signals: SIGHUP reloads the config file; SIGTERM or SIGINT drains (stop accepting, finish
/// in-flight requests up to --drain-timeout) and exits.
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, subcommand_negates_reqs = true)]
struct Args {
    /// Without a command, the proxy runs.
    #[command(subcommand)]
    command: Option<Command>,

    /// Config file: YAML, or JSON when the name ends in .json. Reloaded when it changes and on SIGHUP;
    /// a bad file keeps the running config. Takes precedence over --control-plane.
    #[arg(long, env = "WEFT_CONFIG", value_name = "FILE", required_unless_present = "control_plane")]
    config: Option<PathBuf>,

    /// The operator (HOST:PORT, gRPC over TLS): with --token-file and --trust-bundle-file the
    /// proxy gets its certificate from the mesh CA there; it subscribes for its workload and its
    /// destinations, keeps its last config when the stream breaks, and reconnects with backoff.
    #[arg(long, env = "WEFT_CONTROL_PLANE", value_name = "HOST:PORT")]
    control_plane: Option<String>,

    /// The DNS name the operator's certificate must carry (default: the host of --control-plane).
    #[arg(long, env = "WEFT_CONTROL_PLANE_NAME", value_name = "NAME")]
    control_plane_name: Option<String>,

    /// This pod's projected ServiceAccount token (audience weft-ca), sent to the mesh CA with
    /// each certificate request. Without --cert-file, the proxy's identity comes from the CA.
    #[arg(long, env = "WEFT_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// The mesh's trust domain and this pod's ServiceAccount: the identity the proxy expects
    /// from the CA (a mismatch is refused, loudly).
    #[arg(long, env = "WEFT_TRUST_DOMAIN", value_name = "DOMAIN")]
    trust_domain: Option<String>,

    #[arg(long, env = "WEFT_SERVICE_ACCOUNT", value_name = "NAME")]
    service_account: Option<String>,

    /// This pod's name (the control plane's node is <pod>.<namespace>).
    #[arg(long, env = "POD_NAME", default_value = "", value_name = "NAME")]
    pod_name: String,

    /// This pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default", value_name = "NAMESPACE")]
    pod_namespace: String,

    /// This pod's workload (Deployment, StatefulSet, ... name), for metric labels; the injector
    /// sets it.
    #[arg(long, env = "WEFT_WORKLOAD", default_value = "", value_name = "NAME")]
    workload: String,

    /// This proxy's certificate chain (PEM, leaf first, one SPIFFE ID as URI SAN). With
    /// --key-file and --trust-bundle-file, every inbound and explicit listener terminates mesh
    /// mTLS (TLS 1.3, client certificate required), and endpoints whose config names an identity
    /// are reached through mTLS checking that identity. The files are re-read when they change;
    /// a bad set keeps the running identity. Until one loads, /ready says no.
    #[arg(long, env = "WEFT_CERT_FILE", value_name = "FILE", requires_all = ["key_file", "trust_bundle_file"])]
    cert_file: Option<PathBuf>,

    /// The private key of --cert-file (PEM).
    #[arg(long, env = "WEFT_KEY_FILE", value_name = "FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,

    /// The roots peers' (and the operator's) certificates must chain to (PEM, several during a
    /// root rotation). Re-read when it changes.
    #[arg(long, env = "WEFT_TRUST_BUNDLE_FILE", value_name = "FILE")]
    trust_bundle_file: Option<PathBuf>,

    /// Deadline for reading a mesh ClientHello, and then for the TLS handshake.
    #[arg(long, env = "WEFT_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    tls_handshake_timeout: Duration,

    /// Destinations to subscribe to from the start (service names or virtual IPs), comma-separated.
    #[arg(long, env = "WEFT_DESTINATIONS", value_delimiter = ',', value_name = "NAMES")]
    destinations: Vec<String>,

    /// How often the config file is checked for changes.
    #[arg(long, env = "WEFT_CONFIG_POLL", default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    config_poll: Duration,

    /// Admin server: /live, /ready, /config, /metrics, POST /shutdown (loopback peers only).
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "0.0.0.0:15000", value_name = "ADDR")]
    admin_addr: SocketAddr,

    /// Listener for outbound connections redirected by iptables (reads SO_ORIGINAL_DST).
    #[arg(long, env = "WEFT_OUTBOUND_ADDR", default_value = "0.0.0.0:15001", value_name = "ADDR")]
    outbound_addr: SocketAddr,

    /// Listener for inbound connections redirected by iptables; they go to the app on
    /// --inbound-forward-ip and the original port.
    #[arg(long, env = "WEFT_INBOUND_ADDR", default_value = "0.0.0.0:15006", value_name = "ADDR")]
    inbound_addr: SocketAddr,

    /// Do not open the outbound and inbound (redirect) listeners: explicit listeners only.
    #[arg(long, env = "WEFT_NO_REDIRECT")]
    no_redirect: bool,

    /// Where inbound traffic goes: the app, on this IP and the connection's original port.
    #[arg(long, env = "WEFT_INBOUND_FORWARD_IP", default_value = "127.0.0.1", value_name = "IP")]
    inbound_forward_ip: std::net::IpAddr,

    /// The app's HTTP and TCP probes, as the injector rewrote them to the admin port: a JSON
    /// object from each /app-health/<container>/<kind> path to the original probe, e.g.
    /// {"/app-health/web/readyz":{"port":8080,"path":"/healthz"}}. The admin server runs them
    /// against the app on --inbound-forward-ip. Invalid JSON stops the proxy at startup.
    #[arg(long, env = "WEFT_APP_PROBES", value_parser = weft_proxy::probes::AppProbes::parse, value_name = "JSON")]
    app_probes: Option<weft_proxy::probes::AppProbes>,

    /// An explicit listener (repeatable): ADDR routes HTTP by Host; ADDR=HOST:PORT also sends
    /// opaque TCP (and HTTP whose Host names no service) to that service and port.
    #[arg(long = "listen", env = "WEFT_LISTEN", value_delimiter = ',', value_parser = parse_listener, value_name = "ADDR[=HOST:PORT]")]
    listen: Vec<ExplicitListener>,

    /// An explicit inbound listener (repeatable): connections to ADDR are inbound to the app's
    /// PORT, as if redirected there (mesh tunnels end, the inbound policy applies). For hosts
    /// without iptables.
    #[arg(long = "listen-inbound", env = "WEFT_LISTEN_INBOUND", value_delimiter = ',', value_parser = parse_inbound_listener, value_name = "ADDR=PORT")]
    listen_inbound: Vec<InboundListener>,

    /// Ports always treated as opaque TCP, skipping protocol detection (server-speaks-first
    /// protocols such as MySQL or SMTP). Comma-separated.
    #[arg(long, env = "WEFT_OPAQUE_PORTS", value_delimiter = ',', value_name = "PORTS")]
    opaque_ports: Vec<u16>,

    /// How long to wait for a connection's first bytes before treating it as opaque TCP.
    #[arg(long, env = "WEFT_DETECT_TIMEOUT", default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
    detect_timeout: Duration,

    /// HTTP/1 request head (request line and headers) read deadline, from the head's first byte;
    /// also the wait for the HTTP/2 client preface where it is not detected.
    #[arg(long, env = "WEFT_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    header_read_timeout: Duration,

    /// The longest the proxy waits for the next bytes of a request body while the upstream has
    /// not answered yet: then 408 and, on HTTP/1.1, a closed connection. Time the upstream spends
    /// not reading does not count, and gRPC requests have none; 0s disables it.
    #[arg(long, env = "WEFT_REQUEST_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    request_body_timeout: Duration,

    /// The least average rate of a request body, in bytes/s over the time the proxy waits for
    /// it, before the upstream has answered (Apache's `MinRate`): the proxy waits for a body at
    /// most --request-body-timeout plus one second per this many bytes received, then 408. gRPC
    /// requests have none; 0 disables it.
    #[arg(long, env = "WEFT_REQUEST_BODY_MIN_RATE", default_value_t = 500, value_name = "BYTES_PER_SECOND")]
    request_body_min_rate: u32,

    /// Close a downstream HTTP connection with no request in flight and no bytes for this long.
    #[arg(long, env = "WEFT_HTTP_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    http_idle_timeout: Duration,

    /// Park an HTTP/1 keep-alive connection with no request in flight and no bytes for this
    /// long: its buffers are freed until the next bytes arrive. 0 never parks.
    #[arg(long, env = "WEFT_HTTP1_PARK_AFTER", default_value = "100ms", value_parser = parse_duration, value_name = "DURATION")]
    http1_park_after: Duration,

    /// Close an opaque TCP connection with no bytes in either direction for this long.
    #[arg(long, env = "WEFT_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    tcp_idle_timeout: Duration,

    /// Upstream connect timeout (a service's connectionPool.connectTimeoutMs overrides it).
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,

    /// Close pooled upstream connections idle this long (connectionPool.idleTimeoutMs overrides it).
    #[arg(long, env = "WEFT_UPSTREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration, value_name = "DURATION")]
    upstream_idle_timeout: Duration,

    /// On SIGTERM, how long in-flight requests and connections get to finish.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,

    /// Concurrent downstream connections per listener; more are closed at accept.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 10_000, value_name = "N")]
    max_connections: usize,

    /// Largest HTTP/1 request head and HTTP/2 header list, in bytes (431 or stream reset beyond).
    #[arg(long, env = "WEFT_MAX_HEADER_BYTES", default_value_t = 64 * 1024, value_name = "BYTES")]
    max_header_bytes: usize,

    /// Most request header fields, HTTP/1.1 and HTTP/2 alike (431 beyond).
    #[arg(long, env = "WEFT_MAX_HEADERS", default_value_t = 100, value_name = "N")]
    max_headers: usize,

    /// Longest request target (HTTP/1.1) or :path (HTTP/2), in bytes (414 beyond).
    #[arg(long, env = "WEFT_MAX_URI_BYTES", default_value_t = 64 * 1024, value_name = "BYTES")]
    max_uri_bytes: usize,

    /// Concurrent HTTP/2 streams per downstream connection.
    #[arg(long, env = "WEFT_H2_MAX_CONCURRENT_STREAMS", default_value_t = 100, value_name = "N")]
    h2_max_concurrent_streams: u32,

    /// HTTP/2 streams a client may reset before the proxy accepted them (rapid-reset defence);
    /// beyond it the connection gets GOAWAY.
    #[arg(long, env = "WEFT_H2_MAX_PENDING_RESETS", default_value_t = 20, value_name = "N")]
    h2_max_pending_resets: usize,

    /// HTTP/2 streams the proxy may reset for client protocol errors before it sends GOAWAY.
    #[arg(long, env = "WEFT_H2_MAX_LOCAL_RESETS", default_value_t = 1024, value_name = "N")]
    h2_max_local_resets: usize,

    /// Write one JSON access log line per request to stdout.
    #[arg(long, env = "WEFT_ACCESS_LOG")]
    access_log: bool,

    /// Log format on stderr.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `weft_proxy=debug`. The h2 crate's
    /// own warnings (one per flooding connection) are off unless the filter names `h2`.
    #[arg(long, env = "WEFT_LOG", default_value = "info", value_name = "FILTER")]
    log: String,

    /// Runtime worker threads.
    #[arg(long, env = "WEFT_WORKERS", default_value_t = 2, value_name = "N")]
    workers: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the pod's traffic capture (iptables nat rules, in one atomic iptables-restore) and
    /// exit. The injector runs it as the `weft-init` init container, as root with only NET_ADMIN
    /// and NET_RAW.
    Init(InitArgs),
    /// Wait until the proxy beside this process answers /ready, then exit. The injector makes it
    /// the proxy container's postStart hook when native sidecars are off, so apps start after the
    /// proxy is ready.
    Wait(WaitArgs),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// The proxy's UID: its own connections are never redirected.
    #[arg(long, default_value_t = 1337, value_name = "UID")]
    proxy_uid: u32,
    /// Where outbound TCP is redirected (the outbound listener).
    #[arg(long, default_value_t = 15001, value_name = "PORT")]
    outbound_port: u16,
    /// Where inbound TCP is redirected (the inbound listener).
    #[arg(long, default_value_t = 15006, value_name = "PORT")]
    inbound_port: u16,
    /// Inbound destination ports that reach the pod directly (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports that bypass the proxy (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations that bypass the proxy: IP addresses or CIDRs (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "CIDRS")]
    exclude_outbound_cidrs: Vec<String>,
    /// Print the rules instead of installing them.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// The proxy's admin server.
    #[arg(long, default_value = "127.0.0.1:15000", value_name = "ADDR")]
    admin: SocketAddr,
    /// Give up (and fail, so the pod restarts the container) after this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
}

/// `weft-proxy init`: render the capture rules and install them (or print them).
fn init(args: InitArgs) -> anyhow::Result<()> {
    let rules = weft_proxy::iptables::rules(&weft_proxy::iptables::Capture {
        proxy_uid: args.proxy_uid,
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        exclude_inbound_ports: args.exclude_inbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
    })?;
    print!("{rules}");
    if !args.dry_run {
        weft_proxy::iptables::install(&rules)?;
        eprintln!("weft-proxy init: traffic capture installed");
    }
    Ok(())
}

/// `weft-proxy wait`: poll the admin server's /ready.
fn wait(args: WaitArgs) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(weft_proxy::wait::until_ready(args.admin, args.timeout))?;
    eprintln!("weft-proxy wait: the proxy is ready");
    Ok(())
}

impl Args {
    /// Where the identity comes from: files, else the CA on the control plane, else nowhere.
    fn identity(&self) -> anyhow::Result<Option<IdentitySource>> {
        if let (Some(cert), Some(key), Some(bundle)) =
            (&self.cert_file, &self.key_file, &self.trust_bundle_file)
        {
            return Ok(Some(IdentitySource::Files(IdentityFiles {
                cert: cert.clone(),
                key: key.clone(),
                trust_bundle: bundle.clone(),
            })));
        }
        let (Some(addr), Some(token), Some(bundle)) =
            (&self.control_plane, &self.token_file, &self.trust_bundle_file)
        else {
            if self.control_plane.is_some() && self.config.is_none() {
                anyhow::bail!(
                    "--control-plane needs an identity: --token-file and --trust-bundle-file (from the mesh CA), or --cert-file, --key-file and --trust-bundle-file"
                );
            }
            return Ok(None);
        };
        let expected = match (&self.trust_domain, &self.service_account) {
            (Some(td), Some(sa)) => Some(
                weft_identity::SpiffeId::new(td, &self.pod_namespace, sa)
                    .context("--trust-domain, --pod-namespace and --service-account")?,
            ),
            _ => None,
        };
        Ok(Some(IdentitySource::Ca(CaClient {
            addr: addr.clone(),
            server_name: self.control_plane_name.clone().unwrap_or_else(|| host_of(addr).to_owned()),
            token_file: token.clone(),
            trust_bundle_file: bundle.clone(),
            expected,
            poll: self.config_poll,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        })))
    }

    fn settings(self) -> anyhow::Result<Settings> {
        let identity = self.identity()?;
        let redirect = |addr| (!self.no_redirect).then_some(addr);
        let control_plane = match (&self.config, &self.control_plane) {
            (None, Some(addr)) => {
                let pod = if self.pod_name.is_empty() { "weft-proxy" } else { self.pod_name.as_str() };
                let mut cp = ControlPlane::new(
                    addr.clone(),
                    format!("{pod}.{}", self.pod_namespace),
                    self.destinations.clone(),
                );
                if let Some(name) = &self.control_plane_name {
                    cp.server_name = name.clone();
                }
                Some(cp)
            }
            _ => None,
        };
        Ok(Settings {
            config_path: self.config.clone().unwrap_or_default(),
            control_plane,
            config_poll_interval: self.config_poll,
            admin_addr: self.admin_addr,
            outbound_addr: redirect(self.outbound_addr),
            inbound_addr: redirect(self.inbound_addr),
            inbound_forward_ip: self.inbound_forward_ip,
            app_probes: self.app_probes.clone().unwrap_or_default(),
            explicit: self.listen.clone(),
            inbound_explicit: self.listen_inbound.clone(),
            opaque_ports: self.opaque_ports.clone(),
            limits: Limits {
                max_connections: self.max_connections,
                max_header_bytes: self.max_header_bytes,
                max_headers: self.max_headers,
                max_uri_bytes: self.max_uri_bytes,
                h2_max_concurrent_streams: self.h2_max_concurrent_streams,
                h2_max_pending_accept_reset_streams: self.h2_max_pending_resets,
                h2_max_local_error_reset_streams: self.h2_max_local_resets,
            },
            timeouts: Timeouts {
                detect: self.detect_timeout,
                header_read: self.header_read_timeout,
                request_body: self.request_body_timeout,
                request_body_min_rate: self.request_body_min_rate,
                http_idle: self.http_idle_timeout,
                http1_park: self.http1_park_after,
                tcp_idle: self.tcp_idle_timeout,
                connect: self.connect_timeout,
                upstream_idle: self.upstream_idle_timeout,
                drain: self.drain_timeout,
                tls_handshake: self.tls_handshake_timeout,
            },
            access_log: self.access_log,
            identity,
            workload: self.workload.as_str().into(),
            namespace: self.pod_namespace.as_str().into(),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    match args.command.take() {
        Some(Command::Init(init_args)) => return init(init_args),
        Some(Command::Wait(wait_args)) => return wait(wait_args),
        None => {}
    }
    init_tracing(&args.log_format, &args.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .thread_name("weft-proxy")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let settings = args.settings()?;
    runtime.block_on(run(settings))
}

fn init_tracing(format: &str, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(weft_proxy::log_limit::filter(filter))
        .context("parsing --log")?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init()
    } else {
        builder.with_ansi(false).init()
    }
    Ok(())
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let handle = weft_proxy::start(settings).await.context("starting the proxy")?;
    tracing::info!(
        admin = %handle.admin_addr,
        outbound = ?handle.outbound_addr,
        inbound = ?handle.inbound_addr,
        explicit = ?handle.explicit_addrs,
        "weft-proxy started"
    );
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                handle.reload();
            }
            _ = term.recv() => handle.shutdown(),
            _ = int.recv() => handle.shutdown(),
            _ = handle.wait() => break,
        }
    }
    tracing::info!("weft-proxy stopped");
    Ok(())
}
