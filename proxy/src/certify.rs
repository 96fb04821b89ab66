//! The proxy's CA client: it makes a key (which never leaves the process), asks the mesh CA for
//! a certificate with its projected ServiceAccount token, and renews at half the lifetime less
//! a random share of up to a tenth (so a fleet started together does not renew together). When
//! renewal fails it keeps the valid certificate and retries with capped exponential backoff;
//! once a certificate expires it is dropped, so the proxy presents none rather than an expired
//! one and meshed traffic fails closed until the CA answers. The trust bundle is read from its
//! file (the ConfigMap the injector mounts) and reloaded when it changes.
//!
//! When to renew and how long to back off are pure functions ([`renew_at`], [`retry_in`]).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;
use weft_identity::{Credentials, SpiffeId, TrustBundle, request, tls as mesh};
use weft_proto::identity::v1::{self as pb, certificates_client::CertificatesClient};

use crate::{
    metrics::{Metrics, ResultLabels},
    tls::{IdentityStore, MeshTls, unix_seconds},
};

/// Where the CA is and how this proxy proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaClient {
    /// `host:port` of the operator (the control plane).
    pub addr: String,
    /// The DNS name its certificate must carry (by default the host of `addr`).
    pub server_name: String,
    /// The projected ServiceAccount token (audience `weft-ca`), re-read for every request.
    pub token_file: PathBuf,
    /// The mesh's roots (PEM), re-read when the file changes.
    pub trust_bundle_file: PathBuf,
    /// The identity this proxy expects (named in the request, so a mismatch is refused loudly).
    pub expected: Option<SpiffeId>,
    /// How often the bundle file is checked and the certificate's expiry looked at.
    pub poll: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the trust bundle {path}: {source}")]
    Bundle { path: PathBuf, source: weft_identity::credentials::Error },
    #[error("{0}")]
    Request(#[from] request::Error),
    #[error("TLS to the CA: {0}")]
    Tls(#[from] mesh::Error),
    #[error("{0}")]
    Connect(#[from] crate::grpc::Error),
    #[error("the CA refused: {0}")]
    Refused(tonic::Status),
    #[error("the CA's certificate: {0}")]
    Credentials(weft_identity::credentials::Error),
    #[error("the CA issued {got}, this proxy expects {expected}")]
    Unexpected { got: SpiffeId, expected: SpiffeId },
    #[error("the issued certificate does not load: {0}")]
    Load(#[from] crate::tls::Error),
}

/// When to renew a certificate received at `received` and valid until `not_after`: at half the
/// time it has left, less `jitter` (0..1) times a tenth of it. Measured from receipt, not from
/// `notBefore`, which the CA backdates for clock skew (with a short lifetime, half of
/// `notBefore..notAfter` could already be past).
pub fn renew_at(received: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(received).unwrap_or_default();
    received + lifetime / 2 - lifetime.mul_f64(0.1 * jitter.clamp(0.0, 1.0))
}

/// The delay before retry `attempt` (0-based): doubling from `min` to `max`, never past
/// `not_after` (a proxy about to lose its certificate retries at the latest when it does).
pub fn retry_in(
    attempt: u32,
    min: Duration,
    max: Duration,
    now: SystemTime,
    not_after: Option<SystemTime>,
) -> Duration {
    let delay = min.saturating_mul(2u32.saturating_pow(attempt.min(20))).min(max);
    match not_after.and_then(|t| t.duration_since(now).ok()) {
        Some(left) if left < delay => left.max(min),
        _ => delay,
    }
}

async fn read(path: &PathBuf) -> Result<Vec<u8>, Error> {
    tokio::fs::read(path).await.map_err(|source| Error::Read { path: path.clone(), source })
}

/// One certificate from the CA.
pub async fn certify(settings: &CaClient, bundle: &TrustBundle) -> Result<Credentials, Error> {
    let token = read(&settings.token_file).await?;
    let token = String::from_utf8_lossy(&token).trim().to_owned();
    let asked = request::generate(settings.expected.as_ref())?;
    let tls = mesh::control_client_config(bundle, None)?;
    let channel = crate::grpc::connect(&settings.addr, &settings.server_name, tls).await?;
    let mut request = tonic::Request::new(pb::CertifyRequest { csr: asked.request_der.clone() });
    let bearer = format!("Bearer {token}").parse().map_err(|_| {
        Error::Refused(tonic::Status::invalid_argument(
            "the token file holds characters a header cannot carry",
        ))
    })?;
    request.metadata_mut().insert("authorization", bearer);
    let response =
        CertificatesClient::new(channel).certify(request).await.map_err(Error::Refused)?.into_inner();
    let creds = Credentials::from_pem(response.cert_chain.as_bytes(), asked.key_pem.as_bytes())
        .map_err(Error::Credentials)?;
    if let Some(expected) = &settings.expected
        && &creds.id != expected
    {
        return Err(Error::Unexpected { got: creds.id, expected: expected.clone() });
    }
    Ok(creds)
}

/// Keeps this proxy's certificate from the CA in `store` until `stop`.
pub async fn run(
    settings: CaClient,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut bundle_seen: Option<Vec<u8>> = None;
    let mut renew = SystemTime::UNIX_EPOCH; // due at once
    let mut attempt = 0u32;
    loop {
        let now = SystemTime::now();
        // The bundle: reloaded when its bytes change; a bad one keeps the running one.
        match read(&settings.trust_bundle_file).await {
            Ok(bytes) if bundle_seen.as_ref() != Some(&bytes) => {
                let path = &settings.trust_bundle_file;
                match TrustBundle::from_pem(&bytes)
                    .map_err(|source| Error::Bundle { path: path.clone(), source })
                {
                    Ok(bundle) => {
                        bundle_seen = Some(bytes);
                        tracing::info!(roots = bundle.roots.len(), "trust bundle loaded");
                        match store.current() {
                            Some(tls) => match MeshTls::new(&tls.creds, &bundle) {
                                Ok(tls) => store.set(tls),
                                Err(error) => tracing::warn!(%error, "trust bundle not applied"),
                            },
                            None => store.set_bundle(bundle),
                        }
                    }
                    Err(error) => tracing::warn!(%error, "trust bundle rejected; keeping the running one"),
                }
            }
            Ok(_) => {}
            Err(error) if bundle_seen.is_none() => tracing::warn!(%error, "no trust bundle yet"),
            Err(_) => {}
        }
        // Never present an expired certificate.
        if let Some(tls) = store.current()
            && tls.creds.not_after <= now
        {
            tracing::warn!(identity = %tls.creds.id, not_after = ?tls.creds.not_after, "certificate expired; presenting none until the CA answers");
            store.clear();
            metrics.identity_expiry.set(0);
        }
        if now >= renew
            && let Some(bundle) = store.bundle()
        {
            let issued = match certify(&settings, &bundle).await {
                Ok(creds) => MeshTls::new(&creds, &bundle).map_err(Error::from),
                Err(error) => Err(error),
            };
            match issued {
                Ok(tls) => {
                    renew = renew_at(SystemTime::now(), tls.creds.not_after, fastrand::f64());
                    attempt = 0;
                    tracing::info!(identity = %tls.creds.id, not_after = tls.expiry_unix(), renew_at = unix_seconds(renew), "certificate issued by the CA");
                    metrics.identity_expiry.set(tls.expiry_unix());
                    metrics.identity_reloads.get_or_create(&ResultLabels { result: "ok" }).inc();
                    store.set(tls);
                    store.set_next_renewal(renew);
                }
                Err(error) => {
                    let current = store.current();
                    let delay = retry_in(
                        attempt,
                        settings.backoff_min,
                        settings.backoff_max,
                        now,
                        current.as_ref().map(|t| t.creds.not_after),
                    );
                    attempt = attempt.saturating_add(1);
                    renew = now + delay;
                    store.set_next_renewal(renew);
                    metrics.identity_reloads.get_or_create(&ResultLabels { result: "error" }).inc();
                    tracing::warn!(%error, retry_in = ?delay, keeping = ?current.map(|t| t.expiry_unix()), "no certificate from the CA; keeping the valid one");
                }
            }
        }
        // Without a bundle nothing can be asked: look at the file again after `poll`.
        let until_renew = match store.bundle() {
            Some(_) => renew.duration_since(SystemTime::now()).unwrap_or_default(),
            None => settings.poll,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(until_renew.min(settings.poll)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn renewal_is_at_half_life_less_up_to_a_tenth() {
        let after = T0 + Duration::from_secs(1000);
        assert_eq!(renew_at(T0, after, 0.0), T0 + Duration::from_secs(500));
        assert_eq!(renew_at(T0, after, 1.0), T0 + Duration::from_secs(400));
        assert_eq!(renew_at(T0, after, 0.5), T0 + Duration::from_secs(450));
        assert_eq!(renew_at(T0, after, 7.0), T0 + Duration::from_secs(400), "jitter is clamped");
    }

    #[test]
    fn retries_back_off_to_a_cap_but_not_past_expiry() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(30));
        let delays: Vec<u128> = (0..10).map(|a| retry_in(a, min, max, T0, None).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]);
        let soon = Some(T0 + Duration::from_secs(2));
        assert_eq!(retry_in(9, min, max, T0, soon), Duration::from_secs(2));
        assert_eq!(retry_in(9, min, max, T0, Some(T0)), min, "expired: retry at the floor");
    }
}
