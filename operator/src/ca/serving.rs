//! TLS on the operator's gRPC port (15012). The operator's certificate comes from the mesh CA
//! (its SPIFFE ID and the Service's DNS names) and is re-issued at half its lifetime and whenever
//! the CA changes. A client certificate is asked for but not required: the first call a proxy
//! makes is the request for its certificate, authenticated by its token. Each connection's
//! verified identity reaches the RPCs as [`PeerInfo`] in the request's extensions.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use weft_identity::{Credentials, SpiffeId, tls as mesh};

use super::{Authority, CaConfig};
use crate::metrics::Metrics;

/// How long the operator's own certificate lives.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Deadline for a client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("issuing the operator's certificate: {0}")]
    Issue(#[from] weft_identity::ca::Error),
    #[error("loading the operator's certificate: {0}")]
    Credentials(#[from] weft_identity::credentials::Error),
    #[error("the operator's TLS configuration: {0}")]
    Tls(#[from] weft_identity::tls::Error),
    #[error("the operator's SPIFFE ID: {0}")]
    Id(#[from] weft_identity::spiffe::Error),
}

/// Who is on the other end of a connection, for the RPCs.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The SPIFFE ID of the client's certificate (verified against the bundle), if it sent one.
    pub identity: Option<SpiffeId>,
}

/// The serving configuration, swapped whole on renewal.
#[derive(Debug)]
pub struct ServingTls {
    config: ArcSwapOption<ServerConfig>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Default for ServingTls {
    fn default() -> Self {
        ServingTls { config: ArcSwapOption::empty(), ready: tokio::sync::watch::channel(false).0 }
    }
}

impl ServingTls {
    pub fn current(&self) -> Option<Arc<ServerConfig>> {
        self.config.load_full()
    }

    pub fn set(&self, config: Arc<ServerConfig>) {
        self.config.store(Some(config));
        self.ready.send_replace(true);
    }

    /// Resolves once a certificate is being served.
    pub async fn ready(&self) {
        let _ = self.ready.subscribe().wait_for(|ready| *ready).await;
    }
}

/// When to re-issue a certificate issued at `issued` and valid until `not_after`: at half its
/// life (from issue, not from the backdated `notBefore`).
pub fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    issued + not_after.duration_since(issued).unwrap_or_default() / 2
}

/// Keeps the operator's certificate current until `stop`.
pub async fn keep_certificate(
    config: CaConfig,
    cluster_domain: String,
    authority: Arc<Authority>,
    serving: Arc<ServingTls>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut changes = authority.changes();
    loop {
        // Marked seen before reading the CA, so a change while issuing wakes the next pass.
        changes.borrow_and_update();
        let wait = match authority.current() {
            None => Duration::MAX,
            Some(signer) => match issue(&config, &cluster_domain, &signer) {
                Ok((tls, creds)) => {
                    serving.set(tls);
                    info!(identity = %creds.id, not_after = ?creds.not_after, "serving certificate issued");
                    renew_at(SystemTime::now(), creds.not_after)
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(Duration::from_secs(1))
                }
                Err(error) => {
                    metrics.record_error("ca_serving_certificate");
                    warn!(%error, "could not issue the operator's certificate; retrying");
                    Duration::from_secs(5)
                }
            },
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait.min(Duration::from_secs(86_400))) => {}
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

fn issue(
    config: &CaConfig,
    cluster_domain: &str,
    signer: &super::authority::Signer,
) -> Result<(Arc<ServerConfig>, Credentials), Error> {
    let id = SpiffeId::new(&config.trust_domain, &config.namespace, &config.service_account)?;
    let issued = signer.issuer.issue_with_dns(
        &id,
        &config.dns_names(cluster_domain),
        SystemTime::now(),
        SERVING_LIFETIME,
    )?;
    let creds = Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())?;
    Ok((mesh::control_server_config(&creds, &signer.bundle)?, creds))
}

/// One accepted TLS connection, with who the peer is.
pub struct Connection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("info", &self.info).finish_non_exhaustive()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and completes each handshake on its own task; connections arrive on
/// the returned channel. Until the first certificate is issued, connections are closed at once.
pub fn incoming(
    listener: TcpListener,
    serving: Arc<ServingTls>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> mpsc::Receiver<Result<Connection, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Small gRPC frames must not wait for Nagle (a 40 ms stall per call otherwise).
            let _ = tcp.set_nodelay(true);
            let Some(config) = serving.current() else {
                debug!(%remote, "no serving certificate yet; closing");
                continue;
            };
            let (tx, metrics) = (tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let handshake = TlsAcceptor::from(config).accept(tcp);
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        metrics.record_error("grpc_tls_handshake");
                        debug!(%remote, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.record_error("grpc_tls_handshake");
                        return;
                    }
                };
                let identity = mesh::peer_identity(stream.get_ref().1.peer_certificates()).ok();
                let info = PeerInfo { remote: Some(remote), identity };
                let _ = tx.send(Ok(Connection { stream, info })).await;
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(renew_at(start, start + Duration::from_secs(100)), start + Duration::from_secs(50));
        assert_eq!(renew_at(start, start), start, "a zero lifetime is due at once");
    }
}
