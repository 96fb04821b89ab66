//! A workload's credentials (certificate chain and private key) and the mesh's trust bundle,
//! parsed from PEM. The key never appears in `Debug` output or errors.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::spiffe::{self, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate in the PEM data")]
    NoCertificate,
    #[error("reading certificates: {0}")]
    CertificatePem(rustls_pki_types::pem::Error),
    /// Deliberately without the PEM error's detail, which could quote key material.
    #[error("no usable private key in the PEM data (PKCS#8, SEC1 or PKCS#1 expected)")]
    Key,
    #[error("parsing the certificate: {0}")]
    Parse(String),
    #[error("the certificate has no URI SAN with a SPIFFE ID")]
    NoSpiffeId,
    #[error("the certificate has {0} URI SANs; a workload certificate has exactly one")]
    ManyUris(usize),
    #[error("the certificate's URI SAN: {0}")]
    SpiffeId(#[from] spiffe::Error),
    #[error("trust bundle: {0}")]
    Bundle(String),
}

/// One workload's certificate chain (leaf first) and key, with what the leaf says.
#[derive(Clone)]
pub struct Credentials {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id.to_string())
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Credentials {
    /// Parses a PEM chain (leaf first) and its PEM private key. The leaf must carry exactly one
    /// URI SAN, a SPIFFE ID.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Credentials, Error> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::CertificatePem)?;
        let leaf = chain.first().ok_or(Error::NoCertificate)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| Error::Key)?;
        let (id, not_before, not_after) = describe(leaf)?;
        Ok(Credentials { id, chain, key: Arc::new(key), not_before, not_after })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The SPIFFE ID a certificate names (its single URI SAN).
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    describe(cert).map(|(id, _, _)| id)
}

fn describe(cert: &CertificateDer<'_>) -> Result<(SpiffeId, SystemTime, SystemTime), Error> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).map_err(|e| Error::Parse(e.to_string()))?;
    let san = x509.subject_alternative_name().map_err(|e| Error::Parse(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let id = match uris.as_slice() {
        [] => return Err(Error::NoSpiffeId),
        [one] => one.parse()?,
        many => return Err(Error::ManyUris(many.len())),
    };
    let validity = x509.validity();
    Ok((id, unix(validity.not_before.timestamp()), unix(validity.not_after.timestamp())))
}

/// The roots every mesh certificate must chain to (during a root rotation: old and new).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    pub roots: Arc<RootCertStore>,
    /// What each root says (subject, validity), for `/identity` and `weftctl`.
    pub infos: Arc<[CertInfo]>,
}

impl TrustBundle {
    pub fn from_pem(pem: &[u8]) -> Result<TrustBundle, Error> {
        let mut roots = RootCertStore::empty();
        let mut infos = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(Error::CertificatePem)?;
            infos.push(CertInfo::of(&cert)?);
            roots.add(cert).map_err(|e| Error::Bundle(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(Error::Bundle("no certificate in the PEM data".into()));
        }
        Ok(TrustBundle { roots: Arc::new(roots), infos: infos.into() })
    }
}

/// What a certificate says about itself, for people: who it names and who vouched for it, and
/// when it is valid. Not a verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's distinguished name, e.g. `O=weft, CN=weft root CA`.
    pub subject: String,
    pub issuer: String,
    /// Hexadecimal.
    pub serial: String,
    /// URI SANs (a workload certificate's SPIFFE ID) and DNS SANs, in order.
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn of(cert: &CertificateDer<'_>) -> Result<CertInfo, Error> {
        let (_, x509) = X509Certificate::from_der(cert.as_ref()).map_err(|e| Error::Parse(e.to_string()))?;
        let san = x509.subject_alternative_name().map_err(|e| Error::Parse(e.to_string()))?;
        let names = san.iter().flat_map(|s| s.value.general_names.iter());
        let (mut uris, mut dns_names) = (Vec::new(), Vec::new());
        for name in names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                _ => {}
            }
        }
        let validity = x509.validity();
        Ok(CertInfo {
            subject: x509.subject().to_string(),
            issuer: x509.issuer().to_string(),
            serial: x509.raw_serial_as_string().replace(':', ""),
            uris,
            dns_names,
            not_before: unix(validity.not_before.timestamp()),
            not_after: unix(validity.not_after.timestamp()),
            is_ca: x509.is_ca(),
        })
    }

    /// Parses every certificate in PEM data.
    pub fn all_from_pem(pem: &[u8]) -> Result<Vec<CertInfo>, Error> {
        CertificateDer::pem_slice_iter(pem)
            .map(|c| c.map_err(Error::CertificatePem).and_then(|c| CertInfo::of(&c)))
            .collect()
    }
}

fn unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs())
}
