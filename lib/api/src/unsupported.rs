//! Fields of Istio's API that Weft does not implement.
//!
//! A structural CRD schema makes the apiserver prune every field it does not declare, with at most
//! a warning, so a manifest written for Istio would lose part of its meaning without its author
//! knowing. Weft therefore declares each such field and attaches a CEL rule that refuses it with a
//! message naming the field and saying it is not supported. The rules hold whatever field
//! validation the client asks for (`Strict`, `Warn` or `Ignore`).

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Any JSON object, kept as written. Used for Istio fields that are declared only so that the
/// apiserver can refuse them (the field's own rule does that); its content is never read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Unsupported(pub serde_json::Value);

impl JsonSchema for Unsupported {
    fn schema_name() -> Cow<'static, str> {
        "Unsupported".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }
}
