//! Offline checks of objects against Weft's CRD schemas: the OpenAPI part (types, bounds, enums,
//! patterns) with a JSON-schema validator and the CEL rules with kube's CEL evaluator. The
//! apiserver tests in `e2e/` prove the same fixtures against the real thing.

use std::{fs, path::PathBuf};

use serde_json::Value;

pub struct Fixture {
    pub name: String,
    /// The first-line `# expect: <field path>` of an invalid fixture.
    pub expect: Option<String>,
    pub object: Value,
}

pub fn fixtures(kind: &str) -> Vec<Fixture> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path).unwrap();
            let expect =
                text.lines().next().and_then(|line| line.strip_prefix("# expect: ")).map(str::to_owned);
            let object = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            Fixture { name: path.file_name().unwrap().to_string_lossy().into_owned(), expect, object }
        })
        .collect()
}

/// The openAPIV3Schema of the CRD serving `object`'s kind.
pub fn schema_for(object: &Value) -> Value {
    let kind = object["kind"].as_str().expect("object has a kind");
    let crd =
        weft_api::crds().into_iter().find(|crd| crd.spec.names.kind == kind).expect("a CRD for the kind");
    let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).unwrap();
    serde_json::to_value(schema).unwrap()
}

/// Every reason the apiserver would reject `object`, as `<field path>: <message>`.
pub fn schema_errors(object: &Value) -> Vec<String> {
    let schema = schema_for(object);
    let validator = jsonschema::draft4::new(&schema).expect("the CRD schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|error| {
            let mut path = field_path(error.instance_path().as_str());
            // The apiserver reports a missing field at the field itself, not at its parent.
            if let jsonschema::error::ValidationErrorKind::Required { property } = error.kind() {
                path = format!("{path}.{}", property.as_str().unwrap_or_default());
            }
            format!("{path}: {error}")
        })
        .collect();
    if let Err(cel) = kube::core::cel::Validator::new().validate(&schema, object, None) {
        errors.extend(cel.as_slice().iter().map(|e| format!("{}: {}", e.field_path, e.message)));
    }
    errors
}

/// `/spec/http/0/route` as the apiserver writes it: `spec.http[0].route`.
fn field_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').skip(1) {
        if segment.chars().all(|c| c.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment.replace("~1", "/").replace("~0", "~"));
        }
    }
    path
}

/// Numbers compared by value: YAML's `50` and the `50.0` an f64 field writes back are equal.
pub fn normalize_numbers(value: &mut Value) {
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                *value = serde_json::json!(f);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_numbers),
        Value::Object(map) => map.values_mut().for_each(normalize_numbers),
        _ => {}
    }
}
