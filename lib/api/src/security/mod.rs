//! `security.weft.dev/v1alpha1`: mTLS requirements and access control for workloads.

mod authorization_policy;
mod peer_authentication;

use std::collections::BTreeMap;

pub use authorization_policy::*;
pub use peer_authentication::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the security resources.
pub const GROUP: &str = "security.weft.dev";

/// Selects the workloads (pods) a policy applies to. Absent means every workload in the
/// namespace; in the mesh's root namespace, every workload in the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub match_labels: BTreeMap<String, String>,
}
