//! What a pod is to the mesh, read from the pod alone: the workload it belongs to and whether a
//! Weft proxy runs beside it. The injector (at admission) and the operator (from its watch) both
//! use these, so a proxy's own `WEFT_WORKLOAD` and the name its peers see for it agree.

use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use crate::labels::INJECTED_ANNOTATION;

/// Name of the proxy container the injector adds.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// Label the Deployment controller puts on its ReplicaSets' pods; the ReplicaSet is named
/// `<deployment>-<hash>`.
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// The workload a pod belongs to: the Deployment behind its ReplicaSet, else its controller
/// (StatefulSet, DaemonSet, Job, ReplicaSet, ...), else the pod itself. At admission a pod may
/// have only a `generateName` (`web-`), which names it without the trailing `-`. Empty when the
/// metadata names nothing.
pub fn workload_name(meta: &ObjectMeta) -> &str {
    let controller = meta.owner_references.iter().flatten().find(|owner| owner.controller == Some(true));
    if let Some(owner) = controller {
        let hash = meta.labels.as_ref().and_then(|labels| labels.get(POD_TEMPLATE_HASH_LABEL));
        let deployment = hash
            .filter(|hash| owner.kind == "ReplicaSet" && !hash.is_empty())
            .and_then(|hash| owner.name.strip_suffix(hash.as_str())?.strip_suffix('-'));
        return deployment.unwrap_or(&owner.name);
    }
    match (meta.name.as_deref(), meta.generate_name.as_deref()) {
        (Some(name), _) if !name.is_empty() => name,
        (_, Some(prefix)) => prefix.strip_suffix('-').unwrap_or(prefix),
        _ => "",
    }
}

/// Whether a Weft proxy runs in the pod: the injector's `weft.dev/injected` annotation, or a
/// `weft-proxy` container or init container (the annotation may be stripped by some tool).
pub fn is_meshed(meta: &ObjectMeta, spec: Option<&PodSpec>) -> bool {
    let annotated = meta.annotations.as_ref().is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let has_proxy = spec.is_some_and(|spec| {
        spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == PROXY_CONTAINER)
    });
    annotated || has_proxy
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Container;
    use serde_json::json;

    use super::*;

    fn meta(value: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(value).unwrap()
    }

    fn owned_by(kind: &str, name: &str, controller: bool, labels: serde_json::Value) -> ObjectMeta {
        meta(json!({
            "name": "pod-x",
            "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u",
                                 "controller": controller}],
        }))
    }

    #[test]
    fn a_deployments_pod_is_named_after_the_deployment() {
        let pod = owned_by("ReplicaSet", "web-7d4b9c8f5", true, json!({"pod-template-hash": "7d4b9c8f5"}));
        assert_eq!(workload_name(&pod), "web");
        let dashed = owned_by("ReplicaSet", "my-api-v2-5f6d", true, json!({"pod-template-hash": "5f6d"}));
        assert_eq!(workload_name(&dashed), "my-api-v2");
    }

    #[test]
    fn a_replica_set_without_the_hash_names_itself() {
        let bare = owned_by("ReplicaSet", "web", true, json!({}));
        assert_eq!(workload_name(&bare), "web");
        let other_hash = owned_by("ReplicaSet", "web-abc", true, json!({"pod-template-hash": "xyz"}));
        assert_eq!(workload_name(&other_hash), "web-abc");
    }

    #[test]
    fn other_controllers_name_the_workload() {
        for kind in ["StatefulSet", "DaemonSet", "Job"] {
            // The hash label means nothing outside ReplicaSets.
            let pod = owned_by(kind, "db-abc", true, json!({"pod-template-hash": "abc"}));
            assert_eq!(workload_name(&pod), "db-abc", "{kind}");
        }
    }

    #[test]
    fn without_a_controller_the_pod_names_itself() {
        let not_controller = owned_by("ConfigMap", "settings", false, json!({}));
        assert_eq!(workload_name(&not_controller), "pod-x");
        assert_eq!(workload_name(&meta(json!({"name": "debug"}))), "debug");
        // At admission time: only a generateName.
        assert_eq!(workload_name(&meta(json!({"generateName": "batch-"}))), "batch");
        assert_eq!(workload_name(&meta(json!({"name": "", "generateName": "batch"}))), "batch");
        assert_eq!(workload_name(&ObjectMeta::default()), "");
    }

    #[test]
    fn meshed_by_the_annotation_or_a_proxy_container() {
        let plain = meta(json!({"name": "p", "annotations": {"weft.dev/inject": "true"}}));
        let app = PodSpec {
            containers: vec![Container { name: "app".into(), ..Container::default() }],
            ..PodSpec::default()
        };
        assert!(!is_meshed(&plain, None));
        assert!(!is_meshed(&plain, Some(&app)));

        let annotated = meta(json!({"name": "p", "annotations": {"weft.dev/injected": "{}"}}));
        assert!(is_meshed(&annotated, None));

        let proxy = Container { name: PROXY_CONTAINER.into(), ..Container::default() };
        let sidecar = PodSpec { containers: vec![proxy.clone()], ..PodSpec::default() };
        let native = PodSpec { init_containers: Some(vec![proxy]), ..app };
        assert!(is_meshed(&plain, Some(&sidecar)));
        assert!(is_meshed(&plain, Some(&native)));
    }
}
