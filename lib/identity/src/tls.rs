//! rustls configurations for mTLS between proxies (TLS 1.3 only, ring provider).
//!
//! - The server asks every client for a certificate chaining to the trust bundle; the caller
//!   reads the client's identity from it afterwards (`peer_identity`) for policy and metrics.
//! - The client names the identity it expects in SNI (`SpiffeId::server_name`) and accepts only
//!   a server certificate for exactly that SPIFFE ID — never a DNS name check: a mesh workload
//!   is who its certificate says, wherever it runs.
//! - The control plane (the operator's port 15012) is reached with ordinary DNS-name checks
//!   against the same bundle (`control_client_config`); it asks for a client certificate but
//!   does not require one, because a proxy's first call is the request for its certificate
//!   (`control_server_config`): each RPC decides whether it needs the caller's identity.
//! - ALPN says what the tunnel carries, so the receiving proxy never has to detect it: `weft/h2`,
//!   `weft/http1`, `weft/h2-http1` (HTTP/2 carrying an HTTP/1 app's requests) or `weft/tcp`. A
//!   TLS connection offering none of these is not mesh traffic (e.g. the app's own TLS) and
//!   passes through untouched. A client asking for `weft/h2-http1` also offers `weft/http1`, which
//!   a server that predates the former picks instead (mixed versions during a rollout); servers
//!   that know it prefer it.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{
    credentials::{Credentials, TrustBundle, identity_of},
    spiffe::SpiffeId,
};

/// What a mesh TLS connection carries, named by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tunnel {
    Http1,
    Http2,
    /// HTTP/2 between the proxies, carrying the requests of apps that speak HTTP/1.1: many
    /// requests share one connection, and the receiving proxy hands them to its app as HTTP/1.1.
    Http1OverH2,
    Tcp,
}

impl Tunnel {
    /// In the server's order of preference.
    pub const ALL: [Tunnel; 4] = [Tunnel::Http2, Tunnel::Http1OverH2, Tunnel::Http1, Tunnel::Tcp];

    pub fn alpn(self) -> &'static [u8] {
        match self {
            Tunnel::Http1 => b"weft/http1",
            Tunnel::Http2 => b"weft/h2",
            Tunnel::Http1OverH2 => b"weft/h2-http1",
            Tunnel::Tcp => b"weft/tcp",
        }
    }

    pub fn from_alpn(alpn: &[u8]) -> Option<Tunnel> {
        Tunnel::ALL.into_iter().find(|t| t.alpn() == alpn)
    }

    /// What a client offers for this tunnel, first choice first.
    pub fn offer(self) -> Vec<Vec<u8>> {
        match self {
            Tunnel::Http1OverH2 => vec![self.alpn().to_vec(), Tunnel::Http1.alpn().to_vec()],
            _ => vec![self.alpn().to_vec()],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer's certificate: {0}")]
    PeerCertificate(#[from] crate::credentials::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side of mesh mTLS: requires a client certificate from the bundle, offers every
/// tunnel ALPN.
pub fn server_config(creds: &Credentials, bundle: &TrustBundle) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key())?;
    config.alpn_protocols = Tunnel::ALL.iter().map(|t| t.alpn().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The client side of mesh mTLS for one tunnel kind: presents `creds`, and accepts a server
/// only for the identity named in the connection's SNI (see `server_name`).
pub fn client_config(
    creds: &Credentials,
    bundle: &TrustBundle,
    tunnel: Tunnel,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(MeshServerVerifier {
        roots: bundle.roots.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // the verifier below checks the chain and the SPIFFE ID instead of a DNS name
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key())?;
    config.alpn_protocols = tunnel.offer();
    Ok(Arc::new(config))
}

/// The operator's side of the control-plane connection: its serving certificate; a client
/// certificate is verified against the bundle when one is presented (`peer_identity` then names
/// the caller) and not required. HTTP/2 only.
pub fn control_server_config(creds: &Credentials, bundle: &TrustBundle) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A proxy's side of the control-plane connection: the server must present a certificate for
/// the DNS name dialed, chaining to the bundle; `creds`, when the proxy has them, identify it.
pub fn control_client_config(
    bundle: &TrustBundle,
    creds: Option<&Credentials>,
) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(bundle.roots.clone());
    let mut config = match creds {
        Some(creds) => builder.with_client_auth_cert(creds.chain.clone(), creds.key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The SNI for a connection to `id`.
pub fn server_name(id: &SpiffeId) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(id.server_name())
        .map_err(|_| Error::Rustls(rustls::Error::General(format!("{id} has no valid server name"))))
}

/// The identity in the peer's leaf certificate (already verified against the bundle by the
/// handshake).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, Error> {
    let leaf = certs.and_then(<[_]>::first).ok_or(Error::NoPeerCertificate)?;
    Ok(identity_of(leaf)?)
}

/// Verifies a server's chain against the mesh roots, then that its SPIFFE ID is the one the
/// SNI asked for.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = identity_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        match server_name {
            ServerName::DnsName(name) if name.as_ref() == id.server_name() => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
