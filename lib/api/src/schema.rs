//! Schema helpers shared by the resource types.
//!
//! Every string, list and map in a spec is bounded: the apiserver then rejects oversized input
//! itself, and CEL rules over these fields stay inside the apiserver's cost budget. Fields with a
//! meaningful limit (a DNS name, a label value) state it; [`bounded`] gives the rest a default.

use schemars::Schema;
use serde_json::{Map, Value};

/// Default `maxLength` of a string without a stated limit.
pub(crate) const MAX_STRING: u64 = 256;
/// Default `maxItems` of a list without a stated limit.
pub(crate) const MAX_ITEMS: u64 = 64;
/// Default `maxProperties` of a map without a stated limit.
pub(crate) const MAX_PROPERTIES: u64 = 64;

/// A DNS-1123 label: subset names, port names.
pub(crate) const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// Adds default bounds to every unbounded string, list and map under `schema`.
/// Used as `#[schemars(transform = bounded)]` on each spec type.
pub(crate) fn bounded(schema: &mut Schema) {
    if let Some(object) = schema.as_object_mut() {
        bound_object(object);
    }
}

fn bound_object(object: &mut Map<String, Value>) {
    let has_type = |object: &Map<String, Value>, wanted: &str| match object.get("type") {
        Some(Value::String(t)) => t == wanted,
        Some(Value::Array(types)) => types.iter().any(|t| t == wanted),
        _ => false,
    };
    if has_type(object, "string") && !object.contains_key("enum") && !object.contains_key("format") {
        object.entry("maxLength").or_insert(MAX_STRING.into());
    }
    if has_type(object, "array") {
        object.entry("maxItems").or_insert(MAX_ITEMS.into());
    }
    if has_type(object, "object") && object.get("additionalProperties").is_some_and(Value::is_object) {
        object.entry("maxProperties").or_insert(MAX_PROPERTIES.into());
    }
    for key in ["items", "additionalProperties"] {
        if let Some(Value::Object(child)) = object.get_mut(key) {
            bound_object(child);
        }
    }
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        for child in properties.values_mut().filter_map(Value::as_object_mut) {
            bound_object(child);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(children)) = object.get_mut(key) {
            for child in children.iter_mut().filter_map(Value::as_object_mut) {
                bound_object(child);
            }
        }
    }
}
