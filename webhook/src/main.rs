//! `weft-webhook`: the mutating admission webhook that injects Weft's proxy into pods.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tracing::info;
use weft_inject::InjectConfig;
use weft_webhook::{
    server::{AppState, router, serve_tls, watch_certs},
    tls::CertStore,
};

/// Weft's sidecar injector: answers AdmissionReviews for Pod CREATE on /mutate over HTTPS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "WEFT_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// PEM certificate chain served to the apiserver; reloaded when it changes.
    #[arg(long, env = "WEFT_WEBHOOK_TLS_CERT", default_value = "/var/run/secrets/weft/webhook/tls.crt")]
    tls_cert: PathBuf,
    /// PEM private key of that certificate.
    #[arg(long, env = "WEFT_WEBHOOK_TLS_KEY", default_value = "/var/run/secrets/weft/webhook/tls.key")]
    tls_key: PathBuf,
    /// Injection settings (YAML, see charts/weft/values.yaml `proxy`); defaults when absent.
    #[arg(long, env = "WEFT_WEBHOOK_CONFIG")]
    config: Option<PathBuf>,
    /// How often the certificate files are checked for a renewal.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    cert_reload_interval: u64,
    /// Log format: text or json.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    let config = InjectConfig::load(args.config.as_deref())?;
    let certs = Arc::new(CertStore::load(&args.tls_cert, &args.tls_key)?);
    let listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    info!(address = %args.listen, image = %config.proxy_image, native_sidecar = config.native_sidecar, "serving");

    let (stop, stopped) = watch::channel(false);
    tokio::spawn(watch_certs(certs.clone(), Duration::from_secs(args.cert_reload_interval.max(1))));
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutting down");
        let _ = stop.send(true);
    });
    serve_tls(listener, certs, router(AppState::new(config)), stopped).await;
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
