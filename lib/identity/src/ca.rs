//! The certificate issuer (feature `ca`): a CA that signs workload certificates for SPIFFE IDs
//! (ECDSA P-256, usable for both TLS server and client authentication), from a certificate
//! request whose key never left the workload (`sign_request`) or with a key of its own
//! (`issue`, for tests and benchmarks), and DNS serving certificates (`issue_dns`).
//!
//! The CA is either a root made here (`new_root`) or material a user brings (`from_pem`: an
//! intermediate, its chain and the roots, as Istio's `cacerts`). A leaf never outlives the
//! certificate that signed it.

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer as RcgenIssuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Deliberately without detail from the key's parser, which could quote key material.
    #[error("the CA key is not a usable private key (PEM, PKCS#8 ECDSA P-256 expected)")]
    Key,
    #[error("the CA certificate: {0}")]
    Certificate(String),
    #[error("the certificate request: {0}")]
    Request(String),
    #[error("the certificate request names {asked:?}; the caller is {id}")]
    RequestNames { asked: Vec<String>, id: String },
    #[error("the CA certificate expired at {0:?}")]
    Expired(SystemTime),
}

/// Clock skew tolerated between the issuer and the peers that check its certificates.
const BACKDATE: Duration = Duration::from_secs(60);

/// A CA: its signing key and certificate, the chain from it to a root, and the roots.
pub struct Issuer {
    /// Its common name, for `Debug`.
    name: String,
    /// The signing certificate, then any intermediates above it (not the root), PEM. Appended
    /// to every leaf, so peers can build the path to a root they trust.
    chain_pem: String,
    /// The trust anchors, PEM: the trust bundle's content.
    roots_pem: String,
    key_pem: String,
    not_after: SystemTime,
    issuer: RcgenIssuer<'static, KeyPair>,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("name", &self.name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A signed certificate request: the chain (leaf first, PEM) and when the leaf expires.
#[derive(Clone, Debug)]
pub struct Signed {
    pub chain_pem: String,
    pub not_after: SystemTime,
}

/// A freshly issued certificate and its key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

fn at(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn new_key() -> Result<KeyPair, Error> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

impl Issuer {
    /// The mesh root for `trust_domain`, valid from `now` (less a minute of skew) for `lifetime`.
    pub fn new_root(trust_domain: &str, now: SystemTime, lifetime: Duration) -> Result<Issuer, Error> {
        Issuer::new_ca("weft root CA", Some(trust_domain), now, lifetime)
    }

    /// A self-signed CA that signs end-entity certificates only (path length 0), valid from
    /// `now` (less a minute of skew) for `lifetime`.
    pub fn new_ca(
        common_name: &str,
        organization: Option<&str>,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issuer, Error> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        if let Some(organization) = organization {
            params.distinguished_name.push(DnType::OrganizationName, organization);
        }
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.not_before = at(now - BACKDATE);
        params.not_after = at(now + lifetime);
        let root = params.self_signed(&key)?;
        let root_pem = root.pem();
        Ok(Issuer {
            name: common_name.to_owned(),
            chain_pem: root_pem.clone(),
            roots_pem: root_pem,
            key_pem: key.serialize_pem(),
            not_after: now + lifetime,
            issuer: RcgenIssuer::new(params, key),
        })
    }

    /// A CA from PEM material: the signing certificate and its key, the intermediates between
    /// it and a root (may be empty), and the roots peers trust. For a self-made root, `cert_pem`
    /// and `roots_pem` are the same certificate.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        intermediates_pem: &str,
        roots_pem: &str,
    ) -> Result<Issuer, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| Error::Key)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(Error::Certificate("it is not a CA certificate (basicConstraints cA=false)".into()));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::Certificate("the key does not belong to the certificate".into()));
        }
        let name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("CA")
            .to_owned();
        let not_after =
            UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp().max(0).unsigned_abs());
        let ders = |pem: &str| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Certificate(e.to_string()))
        };
        let roots = ders(roots_pem)?;
        if roots.is_empty() {
            return Err(Error::Certificate("no root certificate".into()));
        }
        chains_to_a_root(&cert, &ders(intermediates_pem)?, &roots)?;
        let issuer = RcgenIssuer::from_ca_cert_der(&cert, key)?;
        let chain_pem = [cert_pem, intermediates_pem]
            .iter()
            .map(|pem| pem.trim())
            .filter(|pem| !pem.is_empty())
            .map(|pem| format!("{pem}\n"))
            .collect();
        Ok(Issuer {
            name,
            chain_pem,
            roots_pem: roots_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            not_after,
            issuer,
        })
    }

    /// The trust anchors (the trust bundle's content), PEM.
    pub fn root_pem(&self) -> &str {
        &self.roots_pem
    }

    /// The signing certificate and the intermediates above it, PEM.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The signing certificate alone, PEM (the first of `chain_pem`).
    pub fn cert_pem(&self) -> &str {
        let end = "-----END CERTIFICATE-----";
        self.chain_pem.find(end).map_or(&self.chain_pem, |i| &self.chain_pem[..i + end.len() + 1])
    }

    /// The signing key, PEM: only for storing it where the CA lives (a Secret).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the signing certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// `lifetime` from `now`, cut to end with the signing certificate.
    fn validity(&self, now: SystemTime, lifetime: Duration) -> Result<(SystemTime, SystemTime), Error> {
        if self.not_after <= now {
            return Err(Error::Expired(self.not_after));
        }
        Ok((now - BACKDATE, (now + lifetime).min(self.not_after)))
    }

    /// A workload leaf for `id`: one URI SAN, not a CA, digitalSignature, server and client auth.
    fn leaf_params(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(CertificateParams, SystemTime), Error> {
        let (not_before, not_after) = self.validity(now, lifetime)?;
        let mut params = CertificateParams::default();
        // The SPIFFE ID is the whole name: an empty subject (so the SAN extension is critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        Ok((params, not_after))
    }

    /// Signs a certificate request (PKCS#10, DER) for `id`, valid from `now` for `lifetime`
    /// (never past the CA's own expiry). Only the request's key is used: the identity is the
    /// caller's, so a request naming any other identity is refused, never copied.
    pub fn sign_request(
        &self,
        request_der: &[u8],
        id: &SpiffeId,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Signed, Error> {
        let request = CertificateSigningRequestParams::from_der(&request_der.into())
            .map_err(|e| Error::Request(e.to_string()))?;
        // rcgen names the algorithm from the request's signature, which says nothing of the
        // curve; an uncompressed P-256 point is 65 bytes (P-384: 97).
        let key = rcgen::PublicKeyData::der_bytes(&request.public_key);
        if request.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 || key.len() != 65 || key[0] != 4
        {
            return Err(Error::Request("the key is not ECDSA P-256".into()));
        }
        let wanted = id.to_string();
        let asked: Vec<String> = request
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                SanType::DnsName(dns) => format!("DNS:{}", dns.as_str()),
                other => format!("{other:?}"),
            })
            .collect();
        if asked.iter().any(|name| name != &wanted) {
            return Err(Error::RequestNames { asked, id: wanted });
        }
        let (params, not_after) = self.leaf_params(id, now, lifetime)?;
        let cert = params.signed_by(&request.public_key, &self.issuer)?;
        Ok(Signed { chain_pem: format!("{}{}", cert.pem(), self.chain_pem), not_after })
    }

    /// Issues a certificate for `id` with a new key, valid from `now` for `lifetime`. The
    /// certificate is the leaf alone; `chain_pem` follows it on the wire when the CA is not the
    /// root.
    pub fn issue(&self, id: &SpiffeId, now: SystemTime, lifetime: Duration) -> Result<Issued, Error> {
        let key = new_key()?;
        let cert = self.leaf_params(id, now, lifetime)?.0.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issues a certificate for `id` that also names `dns_names` (the operator's serving
    /// certificate: proxies check the DNS name they dialed, peers can read its identity), with a
    /// new key. The certificate is followed by `chain_pem`.
    pub fn issue_with_dns(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, Error> {
        let key = new_key()?;
        let (mut params, _) = self.leaf_params(id, now, lifetime)?;
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName(name.clone().try_into()?));
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: format!("{}{}", cert.pem(), self.chain_pem), key_pem: key.serialize_pem() })
    }

    /// Issues a serving certificate for `dns_names` (the first is also the common name) with a
    /// new key, valid from `now` (less a minute of skew) for `lifetime`.
    pub fn issue_dns(
        &self,
        dns_names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, Error> {
        let key = new_key()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let common_name = dns_names.first().map_or(self.name.as_str(), String::as_str);
        params.distinguished_name.push(DnType::CommonName, common_name);
        let (not_before, not_after) = self.validity(now, lifetime)?;
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Whether `cert`, through `intermediates`, is signed by one of `roots` (or is one of them): a
/// plug-in CA whose roots do not match would publish a bundle that verifies nothing.
fn chains_to_a_root(
    cert: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), Error> {
    fn parse<'a>(
        der: &'a CertificateDer<'_>,
    ) -> Result<x509_parser::certificate::X509Certificate<'a>, Error> {
        x509_parser::parse_x509_certificate(der.as_ref())
            .map(|(_, c)| c)
            .map_err(|e| Error::Certificate(e.to_string()))
    }
    let roots: Vec<_> = roots.iter().map(parse).collect::<Result<_, _>>()?;
    let intermediates: Vec<_> = intermediates.iter().map(parse).collect::<Result<_, _>>()?;
    let mut current = parse(cert)?;
    // Each step climbs one issuer; a chain longer than the intermediates given cannot exist.
    for _ in 0..=intermediates.len() {
        if roots.iter().any(|r| r.tbs_certificate.subject_pki == current.tbs_certificate.subject_pki) {
            return Ok(());
        }
        let signed_by = |c: &&x509_parser::certificate::X509Certificate<'_>| {
            c.subject() == current.issuer() && current.verify_signature(Some(c.public_key())).is_ok()
        };
        if roots.iter().any(|r| signed_by(&r)) {
            return Ok(());
        }
        match intermediates.iter().find(signed_by) {
            Some(next) => current = next.clone(),
            None => break,
        }
    }
    Err(Error::Certificate(
        "it does not chain to the roots given (root-cert.pem): proxies would trust nothing it signs".into(),
    ))
}
