//! A workload's side of issuance (feature `request`): a new ECDSA P-256 key that never leaves
//! the process, and a certificate request (PKCS#10) for it to send to the mesh CA.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("making a key and certificate request: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A key and the request that asks for a certificate of it.
pub struct KeyAndRequest {
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate request, DER.
    pub request_der: Vec<u8>,
}

impl fmt::Debug for KeyAndRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAndRequest")
            .field("key_pem", &"<redacted>")
            .field("request_len", &self.request_der.len())
            .finish()
    }
}

/// A new key and a request for it. `expected` names the identity the workload believes it has;
/// the CA refuses the request when the caller's token says otherwise, which makes a
/// misconfiguration loud instead of yielding a certificate for an identity nobody expected.
pub fn generate(expected: Option<&SpiffeId>) -> Result<KeyAndRequest, Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = expected {
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    }
    let request = params.serialize_request(&key)?;
    Ok(KeyAndRequest { key_pem: key.serialize_pem(), request_der: request.der().to_vec() })
}
