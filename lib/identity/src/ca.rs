//! The certificate issuer (feature `ca`): a root that signs workload certificates for SPIFFE
//! IDs (ECDSA P-256, usable for both TLS server and client authentication), and DNS serving
//! certificates (the operator's one-use CA for the injector's webhook certificate). Tests,
//! benchmarks and the demo use it too; the mesh CA will build on it.

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer as RcgenIssuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Clock skew tolerated between the issuer and the peers that check its certificates.
const BACKDATE: Duration = Duration::from_secs(60);

/// A root CA.
pub struct Issuer {
    /// Its common name, for `Debug`.
    name: String,
    root_pem: String,
    issuer: RcgenIssuer<'static, KeyPair>,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A freshly issued workload certificate and its key, both PEM.
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
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
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
        Ok(Issuer {
            name: common_name.to_owned(),
            root_pem: root.pem(),
            issuer: RcgenIssuer::new(params, key),
        })
    }

    /// The root certificate (the trust bundle's content), PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a certificate for `id` with a new key, valid from `now` for `lifetime`.
    pub fn issue(&self, id: &SpiffeId, now: SystemTime, lifetime: Duration) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = at(now - BACKDATE);
        params.not_after = at(now + lifetime);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issues a serving certificate for `dns_names` (the first is also the common name) with a
    /// new key, valid from `now` (less a minute of skew) for `lifetime`.
    pub fn issue_dns(
        &self,
        dns_names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let common_name = dns_names.first().map_or(self.name.as_str(), String::as_str);
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.not_before = at(now - BACKDATE);
        params.not_after = at(now + lifetime);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}
