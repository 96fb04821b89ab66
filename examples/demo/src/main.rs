//! `weft-demo`: the demo app (see the crate docs and `examples/README.md`). Configured by
//! environment variables only; `RUST_LOG` sets the log filter and `LOG_FORMAT=json` the format.
//! `weft-demo get URL` fetches URL once instead and exits 0 on a 2xx answer (for Jobs).

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail};
use tokio::{net::TcpListener, signal::unix::SignalKind};
use tracing::info;
use weft_demo::Config;

#[tokio::main]
async fn main() -> Result<()> {
    init_logging();
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("get") => {
            let url = args.next().context("usage: weft-demo get URL")?;
            let status = weft_demo::call::fetch_once(&url).await.map_err(anyhow::Error::msg)?;
            println!("GET {url}: {status}");
            if !(200..300).contains(&status) {
                bail!("GET {url} answered {status}");
            }
            return Ok(());
        }
        Some(other) => bail!("unknown command {other:?}: run `weft-demo` to serve or `weft-demo get URL`"),
    }
    let config = Config::from_env()?;
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.port));
    let listener = TcpListener::bind(address).await.with_context(|| format!("listening on {address}"))?;
    let mut terminate =
        tokio::signal::unix::signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    info!(
        %address,
        service = %config.identity.service,
        version = %config.identity.version,
        pod = %config.identity.pod,
        namespace = %config.identity.namespace,
        fail_percent = config.fail_percent,
        fail_status = config.fail_status.as_u16(),
        "serving"
    );
    let delay = config.shutdown_delay;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if !delay.is_zero() {
            info!(delay_ms = delay.as_millis() as u64, "terminating: still serving while callers learn it");
            tokio::time::sleep(delay).await;
        }
        info!("shutting down");
    };
    weft_demo::serve(listener, config, shutdown).await;
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colors only on a terminal: container logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    if std::env::var("LOG_FORMAT").is_ok_and(|format| format == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
