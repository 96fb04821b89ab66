//! PeerAuthentication: whether a workload's inbound traffic must be mTLS.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WorkloadSelector;
use crate::{status::Status, unsupported::Unsupported};

/// The mTLS mode for traffic arriving at the selected workloads. The most specific policy wins:
/// workload over namespace over mesh-wide (the root namespace).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "security.weft.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    doc = "The mTLS mode for traffic arriving at the selected workloads.",
    plural = "peerauthentications",
    shortname = "pa",
    namespaced,
    status = "Status",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.mtls.mode",
        description = "The mTLS mode"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::bounded)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// Per-port overrides, keyed by the workload's port number. Needs a `selector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("self.all(port, port.matches('^[0-9]{1,5}$') && int(port) >= 1 && int(port) <= 65535)").message("portLevelMtls keys must be port numbers from 1 to 65535"))]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("targetRef is not supported by Weft: select workloads with selector"))]
    pub target_ref: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("false").message("targetRefs is not supported by Weft: select workloads with selector"))]
    pub target_refs: Vec<Unsupported>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PeerMtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the enclosing scope; PERMISSIVE at the top.
    #[default]
    Unset,
    /// Accept plain text only (mTLS is not terminated).
    Disable,
    /// Accept mTLS and plain text.
    Permissive,
    /// Accept mTLS only.
    Strict,
}
