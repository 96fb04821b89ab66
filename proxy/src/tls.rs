//! Mesh mTLS: this proxy's identity (from files, reloaded when they change, or from the mesh CA
//! by `certify`; the last good one kept when a new one is bad), and both ends of a tunnel
//! between proxies.
//!
//! - `accept` (inbound and explicit listeners): a TLS ClientHello offering a `weft/*` ALPN is
//!   terminated with this proxy's certificate, the client's certificate required; the ALPN says
//!   what the tunnel carries, so nothing is detected twice. Any other TLS (the app's own) passes
//!   through with every byte read so far.
//! - `connect` (upstream): to an endpoint whose config names an identity, TLS with SNI naming that
//!   identity; the handshake fails unless the server's certificate is for exactly it.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{StartHandshake, TlsAcceptor, TlsConnector, client, server};
use weft_identity::{Credentials, SpiffeId, TrustBundle, Tunnel, tls as mesh};

use crate::{io::PrefixedIo, peer::Peer, settings::IdentityFiles};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Credentials { path: PathBuf, source: weft_identity::credentials::Error },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] mesh::Error),
    #[error("the certificate expired at {0:?}")]
    Expired(SystemTime),
}

/// One loaded identity, ready to accept and connect.
pub struct MeshTls {
    /// The certificate chain and key (its identity and validity are read from here).
    pub creds: Credentials,
    pub bundle: TrustBundle,
    /// This proxy as a peer (identity, principal, namespace), built once per load; the workload
    /// is filled in by `Shared::local_peer`.
    pub peer: Peer,
    acceptor: TlsAcceptor,
    connectors: [(Tunnel, TlsConnector); 4],
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("id", &self.peer.principal)
            .field("not_after", &self.creds.not_after)
            .finish()
    }
}

impl MeshTls {
    pub fn new(creds: &Credentials, bundle: &TrustBundle) -> Result<MeshTls, Error> {
        let connector = |t| Ok::<_, Error>((t, TlsConnector::from(mesh::client_config(creds, bundle, t)?)));
        Ok(MeshTls {
            creds: creds.clone(),
            bundle: bundle.clone(),
            peer: Peer::new(Some(creds.id.clone()), ""),
            acceptor: TlsAcceptor::from(mesh::server_config(creds, bundle)?),
            connectors: [
                connector(Tunnel::Http2)?,
                connector(Tunnel::Http1)?,
                connector(Tunnel::Http1OverH2)?,
                connector(Tunnel::Tcp)?,
            ],
        })
    }

    /// When the certificate expires, Unix seconds (metrics, `/ready`, logs).
    pub fn expiry_unix(&self) -> i64 {
        unix_seconds(self.creds.not_after)
    }

    /// Reads and checks the three files.
    pub async fn load(files: &IdentityFiles, now: SystemTime) -> Result<MeshTls, Error> {
        let read = |path: PathBuf| async move {
            tokio::fs::read(&path).await.map_err(|source| Error::Read { path, source })
        };
        let cert = read(files.cert.clone()).await?;
        let key = read(files.key.clone()).await?;
        let bundle = read(files.trust_bundle.clone()).await?;
        let creds = Credentials::from_pem(&cert, &key)
            .map_err(|source| Error::Credentials { path: files.cert.clone(), source })?;
        if creds.not_after <= now {
            return Err(Error::Expired(creds.not_after));
        }
        let bundle = TrustBundle::from_pem(&bundle)
            .map_err(|source| Error::Credentials { path: files.trust_bundle.clone(), source })?;
        MeshTls::new(&creds, &bundle)
    }

    fn connector(&self, tunnel: Tunnel) -> &TlsConnector {
        // The array holds every tunnel kind.
        &self.connectors.iter().find(|(t, _)| *t == tunnel).unwrap_or(&self.connectors[0]).1
    }
}

/// `t` as Unix seconds (0 before the epoch).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The current identity, swapped whole on reload; `None` until one loads, without a source, or
/// once it expired. The trust bundle is kept apart too: a proxy has one before it has a
/// certificate (it checks the CA with it).
#[derive(Debug)]
pub struct IdentityStore {
    current: ArcSwapOption<MeshTls>,
    bundle: ArcSwapOption<TrustBundle>,
    changes: tokio::sync::watch::Sender<u64>,
    /// When `certify` asks the CA next, Unix seconds (0: it does not, e.g. identity from files).
    next_renewal: AtomicI64,
}

impl Default for IdentityStore {
    fn default() -> Self {
        IdentityStore {
            current: ArcSwapOption::empty(),
            bundle: ArcSwapOption::empty(),
            changes: tokio::sync::watch::channel(0).0,
            next_renewal: AtomicI64::new(0),
        }
    }
}

impl IdentityStore {
    pub fn current(&self) -> Option<Arc<MeshTls>> {
        self.current.load_full()
    }

    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.bundle.load_full()
    }

    pub fn set(&self, tls: MeshTls) {
        self.bundle.store(Some(Arc::new(tls.bundle.clone())));
        self.current.store(Some(Arc::new(tls)));
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Some(Arc::new(bundle)));
        self.changes.send_modify(|n| *n += 1);
    }

    /// When the CA is asked next (`certify`), for `/identity`.
    pub fn set_next_renewal(&self, at: SystemTime) {
        self.next_renewal.store(unix_seconds(at), Ordering::Relaxed);
    }

    pub fn next_renewal_unix(&self) -> Option<i64> {
        Some(self.next_renewal.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// Drops the certificate (it expired): the proxy presents none rather than a bad one.
    pub fn clear(&self) {
        self.current.store(None);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Ticks on every change.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Resolves once a certificate is loaded.
    pub async fn loaded(&self) -> Arc<MeshTls> {
        let mut changes = self.changes();
        loop {
            if let Some(tls) = self.current() {
                return tls;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Change detection for the identity files: their modification times and sizes.
pub async fn fingerprint(files: &IdentityFiles) -> Vec<Option<(SystemTime, u64)>> {
    let mut out = Vec::with_capacity(3);
    for path in [&files.cert, &files.key, &files.trust_bundle] {
        let meta = tokio::fs::metadata(path).await.ok();
        out.push(meta.and_then(|m| Some((m.modified().ok()?, m.len()))));
    }
    out
}

/// A terminated mesh tunnel.
#[derive(Debug)]
pub struct Tunneled<I> {
    pub io: server::TlsStream<PrefixedIo<I>>,
    pub peer: SpiffeId,
    pub tunnel: Tunnel,
}

/// What a connection that began with a TLS ClientHello turned out to be.
#[derive(Debug)]
pub enum Accepted<I> {
    Mesh(Box<Tunneled<I>>),
    /// Not for the mesh: forward as opaque TCP, replaying `prefix`.
    Other {
        prefix: Bytes,
        io: I,
    },
}

/// A ClientHello larger than this is not from a Weft proxy.
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Reads the ClientHello (`prefix` is what detection already read) and, when it asks for a
/// mesh tunnel, completes the handshake within `timeout`. Drives rustls' `Acceptor` by hand
/// (rather than `LazyConfigAcceptor`) so that a ClientHello not meant for the mesh can be
/// replayed byte for byte.
pub async fn accept<I>(
    mut io: I,
    prefix: Bytes,
    tls: &MeshTls,
    timeout: Duration,
) -> std::io::Result<Accepted<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let hello = async {
        let mut buf = BytesMut::from(&prefix[..]);
        let mut acceptor = rustls::server::Acceptor::default();
        let mut fed = 0;
        loop {
            while fed < buf.len() {
                match acceptor.read_tls(&mut &buf[fed..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => fed += n,
                }
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => return Ok::<_, std::io::Error>((Some(accepted), buf, fed)),
                Ok(None) if buf.len() < MAX_CLIENT_HELLO => {
                    if io.read_buf(&mut buf).await? == 0 {
                        return Ok((None, buf, fed));
                    }
                }
                // Too long, or not a ClientHello rustls understands: not ours.
                Ok(None) | Err(_) => return Ok((None, buf, fed)),
            }
        }
    };
    let (accepted, mut buf, fed) = match tokio::time::timeout(timeout, hello).await {
        Ok(result) => result?,
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "ClientHello timed out")),
    };
    let tunnel = accepted.as_ref().and_then(|a| a.client_hello().alpn()?.find_map(Tunnel::from_alpn));
    let (Some(accepted), Some(_)) = (accepted, tunnel) else {
        return Ok(Accepted::Other { prefix: buf.freeze(), io });
    };
    // Bytes after what rustls took belong to the handshake that follows.
    let rest = buf.split_off(fed).freeze();
    let start = StartHandshake::from_parts(accepted, PrefixedIo::new(rest, io));
    let stream = tokio::time::timeout(timeout, start.into_stream(tls.acceptor.config().clone()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let (_, conn) = stream.get_ref();
    let peer = mesh::peer_identity(conn.peer_certificates()).map_err(std::io::Error::other)?;
    let tunnel = conn.alpn_protocol().and_then(Tunnel::from_alpn).unwrap_or(Tunnel::Tcp);
    Ok(Accepted::Mesh(Box::new(Tunneled { io: stream, peer, tunnel })))
}

/// Opens a mesh tunnel to `identity` over `tcp`.
pub async fn connect(
    tcp: TcpStream,
    identity: &SpiffeId,
    tunnel: Tunnel,
    tls: &MeshTls,
) -> std::io::Result<client::TlsStream<TcpStream>> {
    let name = mesh::server_name(identity).map_err(std::io::Error::other)?;
    tls.connector(tunnel).connect(name, tcp).await
}
