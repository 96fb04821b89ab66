//! One AdmissionReview in, one out: decoding, the decision, and the response. No I/O.

use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};

use weft_inject::{InjectConfig, Injection, SkipReason, inject};

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

/// Property tests: the body comes from the API server, but nothing stops anyone who reaches the
/// service from sending anything. Any bytes get an answer or a [`MalformedReview`], never a
/// panic, and an answer carries the request's uid.
#[cfg(test)]
mod proptests {
    use proptest::{collection::vec, option, prelude::*};
    use serde_json::{Value, json};

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["[ -~]{0,10}", any::<String>()]
    }

    /// Keys the decoder and the injector look for, and others.
    fn key() -> impl Strategy<Value = String> {
        let known = [
            "apiVersion",
            "kind",
            "request",
            "response",
            "uid",
            "object",
            "oldObject",
            "metadata",
            "spec",
            "containers",
            "initContainers",
            "volumes",
            "name",
            "namespace",
            "annotations",
            "labels",
            "operation",
            "hostNetwork",
            "readinessProbe",
            "httpGet",
            "tcpSocket",
            "port",
            "path",
            "ports",
            "containerPort",
            "httpHeaders",
            "value",
            "resource",
            "userInfo",
            "dryRun",
            "group",
            "version",
        ];
        prop_oneof![3 => prop::sample::select(known.to_vec()).prop_map(str::to_owned), 1 => text()]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            prop_oneof![any::<i64>(), -2i64..70_000].prop_map(Value::from),
            any::<f64>()
                .prop_filter_map("not finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
            text().prop_map(Value::String),
            annotation_value().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Values the injector parses: port lists, CIDRs, quantities, booleans.
    fn annotation_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9, ]{0,12}",
            "([0-9]{1,3}\\.){3}[0-9]{1,3}(/[0-9]{1,3})?",
            "[0-9.]{0,5}(m|Mi|Gi|k|E|Ei)?",
            prop::sample::select(vec!["true", "false", "disabled", ""]).prop_map(str::to_owned),
            text(),
        ]
    }

    fn annotations() -> impl Strategy<Value = Value> {
        let name = prop_oneof![
            prop::sample::select(vec![
                weft_api::labels::INJECT_ANNOTATION,
                weft_api::labels::INJECTED_ANNOTATION,
                weft_api::labels::EXCLUDE_INBOUND_PORTS_ANNOTATION,
                weft_api::labels::EXCLUDE_OUTBOUND_PORTS_ANNOTATION,
                weft_api::labels::EXCLUDE_OUTBOUND_CIDRS_ANNOTATION,
                weft_api::labels::PROXY_CPU_ANNOTATION,
                weft_api::labels::PROXY_MEMORY_ANNOTATION,
                weft_api::labels::REWRITE_APP_PROBES_ANNOTATION,
            ])
            .prop_map(str::to_owned),
            text(),
        ];
        prop::collection::btree_map(name, annotation_value(), 0..4).prop_map(|m| json!(m))
    }

    fn probe() -> impl Strategy<Value = Value> {
        let port = prop_oneof![(-2i64..70_000).prop_map(Value::from), text().prop_map(Value::String)];
        let http = (option::of(text()), port.clone(), option::of(text()), vec((text(), text()), 0..2))
            .prop_map(|(path, port, scheme, headers)| {
                let headers: Vec<Value> =
                    headers.into_iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
                json!({"httpGet": {"path": path, "port": port, "scheme": scheme, "httpHeaders": headers}})
            });
        prop_oneof![http, port.prop_map(|port| json!({"tcpSocket": {"port": port}}))]
    }

    fn container() -> impl Strategy<Value = Value> {
        let port = (option::of(text()), -2i64..70_000, option::of(prop_oneof![Just("TCP".to_owned()), text()]))
            .prop_map(|(name, number, protocol)| json!({"name": name, "containerPort": number, "protocol": protocol}));
        let name = prop_oneof![Just("app".to_owned()), Just("weft-init".to_owned()), text()];
        (name, vec(port, 0..2), option::of(probe()), option::of(probe()), option::of(probe())).prop_map(
            |(name, ports, readiness, liveness, startup)| {
                json!({
                    "name": name, "image": "app:1", "ports": ports,
                    "readinessProbe": readiness, "livenessProbe": liveness, "startupProbe": startup,
                })
            },
        )
    }

    fn pod() -> impl Strategy<Value = Value> {
        (
            option::of(prop_oneof![Just("shop".to_owned()), Just("kube-system".to_owned()), text()]),
            annotations(),
            vec(container(), 0..3),
            vec(container(), 0..2),
            option::of(any::<bool>()),
            vec(prop_oneof![Just("weft-token".to_owned()), text()], 0..2),
        )
            .prop_map(|(namespace, annotations, containers, init, host_network, volumes)| {
                let volumes: Vec<Value> =
                    volumes.into_iter().map(|name| json!({"name": name, "emptyDir": {}})).collect();
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "web-", "namespace": namespace, "annotations": annotations},
                    "spec": {
                        "containers": containers, "initContainers": init,
                        "hostNetwork": host_network, "volumes": volumes,
                    },
                })
            })
    }

    fn review_of(uid: &str, kind: &str, operation: &str, namespace: Option<&str>, object: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object,
                "oldObject": null,
                "dryRun": false
            }
        })
    }

    /// Answers `body`: an error names the problem; an answer is one the server can send, with the
    /// uid of the request when it has one.
    fn answer(body: &[u8]) -> Result<Option<(AdmissionResponse, Outcome)>, TestCaseError> {
        match review(body, &InjectConfig::default()) {
            Ok((review, outcome)) => {
                let response = review.response.clone().ok_or_else(|| TestCaseError::fail("no response"))?;
                serde_json::to_vec(&review).map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Typed, as `review` read it: serde skips unknown fields without checking their
                // UTF-8, so a body may decode here and not as a `Value`.
                let request: AdmissionRequest<DynamicObject> =
                    serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?
                        .try_into()
                        .map_err(|_| TestCaseError::fail("no request"))?;
                prop_assert_eq!(&response.uid, &request.uid);
                match outcome {
                    Outcome::Denied => prop_assert!(!response.allowed),
                    Outcome::Injected => prop_assert!(response.allowed && response.patch.is_some()),
                    Outcome::Skipped(_) | Outcome::Ignored => {
                        prop_assert!(response.allowed && response.patch.is_none())
                    }
                }
                Ok(Some((response, outcome)))
            }
            Err(e) => {
                prop_assert!(e.to_string().starts_with("malformed AdmissionReview: "));
                Ok(None)
            }
        }
    }

    /// A valid review, for mutating.
    fn valid() -> Vec<u8> {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "annotations": {"weft.dev/exclude-inbound-ports": "9000"}},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}],
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]},
        });
        serde_json::to_vec(&review_of("u-1", "Pod", "CREATE", Some("shop"), pod)).expect("serializes")
    }

    /// Places in a review where a generated value replaces the valid one.
    const POINTERS: &[&str] = &[
        "",
        "/request",
        "/request/uid",
        "/request/kind",
        "/request/kind/kind",
        "/request/operation",
        "/request/namespace",
        "/request/userInfo",
        "/request/dryRun",
        "/request/object",
        "/request/object/metadata",
        "/request/object/metadata/annotations",
        "/request/object/spec",
        "/request/object/spec/containers",
        "/request/object/spec/containers/0",
        "/request/object/spec/containers/0/ports",
        "/request/object/spec/containers/0/readinessProbe",
        "/request/object/spec/containers/0/readinessProbe/httpGet/port",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_get_an_answer_or_a_malformed_error(bytes in vec(any::<u8>(), 0..256)) {
            let _ = answer(&bytes)?;
        }

        #[test]
        fn any_json_gets_an_answer_or_a_malformed_error(value in json_value()) {
            let _ = answer(&serde_json::to_vec(&value).expect("serializes"))?;
        }

        #[test]
        fn a_valid_review_with_any_part_replaced_gets_an_answer_or_a_malformed_error(
            at in prop::sample::select(POINTERS.to_vec()), value in json_value(),
        ) {
            let mut review: Value = serde_json::from_slice(&valid()).expect("valid JSON");
            *review.pointer_mut(at).expect("the pointer exists") = value;
            let _ = answer(&serde_json::to_vec(&review).expect("serializes"))?;
        }

        #[test]
        fn a_valid_review_with_bytes_changed_gets_an_answer_or_a_malformed_error(
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = valid();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let _ = answer(&bytes)?;
        }

        #[test]
        fn any_pod_review_is_answered_with_its_uid(
            uid in text(),
            kind in prop_oneof![3 => Just("Pod".to_owned()), 1 => text()],
            operation in prop::sample::select(vec!["CREATE", "CREATE", "CREATE", "UPDATE", "DELETE", "CONNECT"]),
            namespace in option::of(prop_oneof![Just("shop".to_owned()), text()]),
            pod in pod(),
        ) {
            let body = serde_json::to_vec(&review_of(&uid, &kind, operation, namespace.as_deref(), pod)).expect("serializes");
            let (response, outcome) = answer(&body)?.ok_or_else(|| TestCaseError::fail("a well-formed review is answered"))?;
            prop_assert_eq!(response.uid, uid);
            if kind != "Pod" || operation != "CREATE" {
                prop_assert_eq!(outcome, Outcome::Ignored);
            }
        }
    }

    /// Found by `a_valid_review_with_bytes_changed_gets_an_answer_or_a_malformed_error` (in the
    /// test, not the webhook): serde skips an unknown field without checking its UTF-8, so such a
    /// review is answered though it is not valid JSON text.
    #[test]
    fn unknown_fields_are_skipped_even_when_not_utf8() {
        let mut body = valid();
        let at = body.len() - 2;
        body.splice(at..at, b",\"extra\":\"\x80\"".iter().copied());
        assert!(serde_json::from_slice::<Value>(&body).is_err());
        let (response, _) = review(&body, &InjectConfig::default()).unwrap();
        assert_eq!(response.response.unwrap().uid, "u-1");
    }

    #[test]
    fn the_valid_review_is_injected() {
        let (response, outcome) = review(&valid(), &InjectConfig::default()).unwrap();
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(response.response.unwrap().uid, "u-1");
    }
}
