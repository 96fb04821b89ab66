//! Applying a YAML stream of Kubernetes objects, as `kubectl apply --server-side` does: each
//! document is server-side applied with the harness's field manager, into its own namespace
//! or the one given.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde::Deserialize;

use crate::cluster::{Error, FIELD_MANAGER};

/// Applies every object in `yaml` (documents separated by `---`; empty ones skipped).
/// Objects without a namespace go to `namespace` when given, else they are cluster-scoped.
/// Returns the objects as the apiserver stored them.
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    namespace: Option<&str>,
) -> Result<Vec<DynamicObject>, Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(document)
            .map_err(|e| Error::Manifest(format!("not YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject =
            serde_json::from_value(value).map_err(|e| Error::Manifest(format!("not an object: {e}")))?;
        let types =
            object.types.clone().ok_or_else(|| Error::Manifest("an object has no apiVersion/kind".into()))?;
        let gvk = GroupVersionKind::try_from(&types).map_err(|e| Error::Manifest(e.to_string()))?;
        let resource = ApiResource::from_gvk(&gvk);
        let name = object
            .metadata
            .name
            .clone()
            .ok_or_else(|| Error::Manifest(format!("a {} has no name", gvk.kind)))?;
        let api: Api<DynamicObject> = match object.metadata.namespace.as_deref().or(namespace) {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let stored = api
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(Error::kube(format!("applying {} {name}", gvk.kind)))?;
        applied.push(stored);
    }
    Ok(applied)
}
