//! Properties of the generated CRDs, and the snapshot that pins them (`crds/*.yaml`).

use std::{fs, path::PathBuf};

use serde_json::Value;

#[test]
fn crds_match_the_committed_snapshots() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    for manifest in weft_api::crd_manifests() {
        let path = dir.join(&manifest.file_name);
        let committed = fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == manifest.yaml,
            "{} differs from the types in lib/api: run `cargo xtask codegen` and review the diff",
            path.display()
        );
    }
}

#[test]
fn crds_are_namespaced_with_status_short_names_and_one_served_version() {
    let short_names: Vec<(String, Vec<String>)> = weft_api::crds()
        .into_iter()
        .map(|crd| {
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.versions.len(), 1);
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, "v1alpha1");
            assert!(version.served && version.storage);
            assert!(
                version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
                "status subresource"
            );
            let status = &version
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap()
                .properties
                .as_ref()
                .unwrap()["status"];
            let status_fields = status.properties.as_ref().unwrap();
            assert!(
                status_fields.contains_key("conditions") && status_fields.contains_key("observedGeneration")
            );
            (crd.spec.names.kind, crd.spec.names.short_names.unwrap_or_default())
        })
        .collect();
    let expected = [
        ("VirtualService", "vs"),
        ("DestinationRule", "dr"),
        ("PeerAuthentication", "pa"),
        ("AuthorizationPolicy", "ap"),
    ];
    assert_eq!(short_names, expected.map(|(kind, short)| (kind.to_owned(), vec![short.to_owned()])));
}

/// The apiserver can only reject oversized input, and keep CEL rules within its cost budget,
/// when every string, list and map that users write has a bound.
#[test]
fn every_string_list_and_map_in_a_spec_is_bounded() {
    for crd in weft_api::crds() {
        let schema = serde_json::to_value(
            crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap(),
        )
        .unwrap();
        let mut unbounded = Vec::new();
        find_unbounded(&schema["properties"]["spec"], "spec", &mut unbounded);
        assert!(unbounded.is_empty(), "{}: unbounded fields {unbounded:?}", crd.spec.names.kind);
    }
}

fn find_unbounded(schema: &Value, path: &str, unbounded: &mut Vec<String>) {
    match schema["type"].as_str() {
        Some("string") if schema.get("enum").is_none() && schema.get("maxLength").is_none() => {
            unbounded.push(path.to_owned())
        }
        Some("array") if schema.get("maxItems").is_none() => unbounded.push(path.to_owned()),
        Some("object")
            if schema.get("additionalProperties").is_some() && schema.get("maxProperties").is_none() =>
        {
            unbounded.push(path.to_owned())
        }
        _ => {}
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (name, child) in properties {
            find_unbounded(child, &format!("{path}.{name}"), unbounded);
        }
    }
    if schema.get("items").is_some() {
        find_unbounded(&schema["items"], &format!("{path}[]"), unbounded);
    }
    if schema["additionalProperties"].is_object() {
        find_unbounded(&schema["additionalProperties"], &format!("{path}{{}}"), unbounded);
    }
}
