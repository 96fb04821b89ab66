//! The `Certificates` gRPC service: a proxy sends a certificate request with its projected
//! ServiceAccount token; the token is checked with a TokenReview against the apiserver (the
//! audience must be the CA's, the token bound to a pod), the pod is read back to see it is still
//! there and running (the apiserver caches a token's review for a few seconds, so a deleted
//! pod's token could pass it), and the certificate names exactly the token's identity.
//!
//! What the review says is judged by a pure function ([`caller_of`]); refusals carry a reason,
//! are counted in `weft_ca_requests_total{result, reason}`, and never log the token.

use std::{sync::Arc, time::SystemTime};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_identity::SpiffeId;
use weft_proto::identity::v1::{self as pb, certificates_server::Certificates};

use super::{Authority, CaConfig};
use crate::metrics::Metrics;

/// The extra fields a bound token carries naming its pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Who a verified token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub id: SpiffeId,
    pub pod: String,
    pub pod_uid: String,
}

/// Why a request was refused. `reason` is the metric label.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("no bearer token in the authorization metadata")]
    NoToken,
    #[error("the token was not accepted: {0}")]
    TokenRejected(String),
    #[error("the token is not for audience {0:?}")]
    WrongAudience(String),
    #[error("the token is not bound to a pod (use a projected ServiceAccount token)")]
    NotPodBound,
    #[error("the token does not belong to a ServiceAccount: {0:?}")]
    NotServiceAccount(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    IdentityMismatch(String),
    #[error("the token's pod {0} is gone or no longer running")]
    PodGone(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::TokenRejected(_) => "token_rejected",
            Refusal::WrongAudience(_) => "wrong_audience",
            Refusal::NotPodBound => "not_pod_bound",
            Refusal::NotServiceAccount(_) => "not_service_account",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::IdentityMismatch(_) => "identity_mismatch",
            Refusal::PodGone(_) => "pod_gone",
        }
    }
}

/// The caller a TokenReview's status names, or why it names none (pure).
pub fn caller_of(status: &TokenReviewStatus, audience: &str, trust_domain: &str) -> Result<Caller, Refusal> {
    if status.authenticated != Some(true) {
        let error = status.error.clone().unwrap_or_default();
        // The apiserver says so in words only; the reason label is worth the match.
        if error.contains("audience") {
            return Err(Refusal::WrongAudience(audience.to_owned()));
        }
        return Err(Refusal::TokenRejected(error));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(Refusal::WrongAudience(audience.to_owned()));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let not_sa = || Refusal::NotServiceAccount(username.clone());
    let rest = username.strip_prefix("system:serviceaccount:").ok_or_else(not_sa)?;
    let (namespace, service_account) = rest.split_once(':').ok_or_else(not_sa)?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|extra| extra.get(key))
            .and_then(|values| values.first())
            .filter(|value| !value.is_empty())
            .cloned()
    };
    let (Some(pod), Some(pod_uid)) = (extra(POD_NAME), extra(POD_UID)) else {
        return Err(Refusal::NotPodBound);
    };
    let id = SpiffeId::new(trust_domain, namespace, service_account).map_err(|_| not_sa())?;
    Ok(Caller { id, pod, pod_uid })
}

/// The bearer token in `authorization` metadata.
fn bearer<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

#[derive(Clone)]
pub struct CertifyService {
    pub client: Client,
    pub config: CaConfig,
    pub authority: Arc<Authority>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CertifyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifyService").field("config", &self.config).finish_non_exhaustive()
    }
}

impl CertifyService {
    async fn review(&self, token: String) -> Result<TokenReviewStatus, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token), audiences: Some(vec![self.config.audience.clone()]) },
            ..TokenReview::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        match reviews.create(&PostParams::default(), &review).await {
            Ok(done) => Ok(done.status.unwrap_or_default()),
            Err(error) => {
                self.metrics.record_ca_request("error", "review_failed");
                warn!(%error, "TokenReview failed");
                Err(Status::unavailable("the token could not be reviewed; retry"))
            }
        }
    }

    /// Whether the caller's pod still exists (same UID), is not being deleted and has not ended.
    async fn pod_is_live(&self, caller: &Caller) -> Result<bool, Status> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), caller.id.namespace());
        match pods.get_opt(&caller.pod).await {
            Ok(pod) => Ok(pod.is_some_and(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                p.metadata.uid.as_deref() == Some(caller.pod_uid.as_str())
                    && p.metadata.deletion_timestamp.is_none()
                    && !matches!(phase, Some("Succeeded" | "Failed"))
            })),
            Err(error) => {
                self.metrics.record_ca_request("error", "pod_lookup_failed");
                warn!(%error, pod = %caller.pod, "reading the caller's pod failed");
                Err(Status::unavailable("the caller's pod could not be read; retry"))
            }
        }
    }

    fn refuse(&self, refusal: Refusal) -> Status {
        self.metrics.record_ca_request("refused", refusal.reason());
        info!(reason = refusal.reason(), %refusal, "certificate request refused");
        match refusal {
            Refusal::BadRequest(_) | Refusal::IdentityMismatch(_) => {
                Status::invalid_argument(refusal.to_string())
            }
            _ => Status::unauthenticated(refusal.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Certificates for CertifyService {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let token = bearer(&request).ok_or_else(|| self.refuse(Refusal::NoToken))?;
        let Some(signer) = self.authority.current() else {
            self.metrics.record_ca_request("error", "no_ca");
            return Err(Status::unavailable("the CA is not loaded yet; retry"));
        };
        let status = self.review(token).await?;
        let caller = caller_of(&status, &self.config.audience, &self.config.trust_domain)
            .map_err(|refusal| self.refuse(refusal))?;
        if !self.pod_is_live(&caller).await? {
            return Err(self.refuse(Refusal::PodGone(format!("{}/{}", caller.id.namespace(), caller.pod))));
        }
        let csr = request.into_inner().csr;
        let now = SystemTime::now();
        let signed = match signer.issuer.sign_request(&csr, &caller.id, now, self.config.workload_ttl) {
            Ok(signed) => signed,
            Err(e @ weft_identity::ca::Error::RequestNames { .. }) => {
                return Err(self.refuse(Refusal::IdentityMismatch(e.to_string())));
            }
            Err(e @ weft_identity::ca::Error::Request(_)) => {
                return Err(self.refuse(Refusal::BadRequest(e.to_string())));
            }
            // The CA's own fault (expired, could not sign): not the caller's.
            Err(error) => {
                self.metrics.record_ca_request("error", "signing_failed");
                warn!(%error, "the CA could not sign");
                return Err(Status::unavailable("the CA could not sign; retry"));
            }
        };
        let not_after = signed.not_after.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.metrics.record_ca_request("issued", "");
        info!(identity = %caller.id, pod = %caller.pod, not_after, "certificate issued");
        Ok(Response::new(pb::CertifyResponse {
            cert_chain: signed.chain_pem,
            trust_bundle: signer.bundle_pem.clone(),
            not_after: i64::try_from(not_after).unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn reviewed(username: &str, pod: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["weft-ca".into()]),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: pod.map(|p| {
                    BTreeMap::from([
                        (POD_NAME.to_owned(), vec![p.to_owned()]),
                        (POD_UID.to_owned(), vec!["uid-1".to_owned()]),
                    ])
                }),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn a_pod_bound_service_account_token_names_its_spiffe_id() {
        let caller =
            caller_of(&reviewed("system:serviceaccount:shop:reviews", Some("reviews-1")), "weft-ca", "td")
                .unwrap();
        assert_eq!(caller.id.to_string(), "spiffe://td/ns/shop/sa/reviews");
        assert_eq!((caller.pod.as_str(), caller.pod_uid.as_str()), ("reviews-1", "uid-1"));
    }

    #[test]
    fn every_other_review_is_refused_with_its_reason() {
        let reason = |s: &TokenReviewStatus| caller_of(s, "weft-ca", "td").unwrap_err().reason();
        assert_eq!(reason(&reviewed("system:serviceaccount:shop:reviews", None)), "not_pod_bound");
        assert_eq!(reason(&reviewed("alice", Some("p"))), "not_service_account");
        let mut other = reviewed("system:serviceaccount:shop:reviews", Some("p"));
        other.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert_eq!(reason(&other), "wrong_audience");
        let rejected = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has been invalidated".into()),
            ..TokenReviewStatus::default()
        };
        assert_eq!(reason(&rejected), "token_rejected");
        let audience = TokenReviewStatus {
            error: Some("token audiences [\"api\"] is invalid for the target audiences [\"weft-ca\"]".into()),
            ..rejected
        };
        assert_eq!(reason(&audience), "wrong_audience");
    }
}
