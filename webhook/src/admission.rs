//! One AdmissionReview in, one out: decoding, the decision, and the response. No I/O.

use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};

use crate::{
    config::InjectConfig,
    inject::{Injection, SkipReason, inject},
};

/// What the webhook did with a review; a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(SkipReason),
    /// Allowed untouched: not a Pod CREATE (the webhook configuration should not send these).
    Ignored,
    /// The pod was refused, with a message naming the problem.
    Denied,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped(_) => "skipped",
            Self::Ignored => "ignored",
            Self::Denied => "denied",
        }
    }
}

/// A body that is not an AdmissionReview with a request; answered with HTTP 400.
#[derive(Debug, thiserror::Error)]
#[error("malformed AdmissionReview: {0}")]
pub struct MalformedReview(String);

/// Answers one AdmissionReview (admission.k8s.io/v1) for a Pod CREATE.
pub fn review(
    body: &[u8],
    config: &InjectConfig,
) -> Result<(AdmissionReview<DynamicObject>, Outcome), MalformedReview> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| MalformedReview(e.to_string()))?;
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| MalformedReview("it has no request".to_owned()))?;
    let (response, outcome) = respond(&request, config);
    Ok((response.into_review(), outcome))
}

fn respond(request: &AdmissionRequest<DynamicObject>, config: &InjectConfig) -> (AdmissionResponse, Outcome) {
    let response = AdmissionResponse::from(request);
    if request.kind.kind != "Pod" || request.operation != Operation::Create {
        return (response, Outcome::Ignored);
    }
    let pod = match request
        .object
        .as_ref()
        .map(|object| serde_json::to_value(object).and_then(serde_json::from_value::<Pod>))
    {
        Some(Ok(pod)) => pod,
        Some(Err(error)) => {
            return (response.deny(format!("the object is not a valid Pod: {error}")), Outcome::Denied);
        }
        None => return (response.deny("the request carries no Pod"), Outcome::Denied),
    };
    let mut pod = pod;
    // A pod created through a controller has no namespace in its body yet.
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace = request.namespace.clone();
    }
    match inject(&pod, config) {
        Ok(Injection::Skip(reason)) => (response, Outcome::Skipped(reason)),
        Ok(Injection::Patch(patch)) => match response.clone().with_patch(patch) {
            Ok(patched) => (patched, Outcome::Injected),
            Err(error) => {
                (response.deny(format!("weft could not encode its patch: {error}")), Outcome::Denied)
            }
        },
        Err(error) => (response.deny(format!("weft sidecar injection: {error}")), Outcome::Denied),
    }
}
