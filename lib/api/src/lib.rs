//! Weft's Kubernetes API: the custom resources users apply and the operator reads.
//!
//! - `networking.weft.dev/v1alpha1`: [`VirtualService`] (routing, splitting, retries, faults) and
//!   [`DestinationRule`] (subsets and traffic policy for one host).
//! - `security.weft.dev/v1alpha1`: [`PeerAuthentication`] (mTLS mode) and
//!   [`AuthorizationPolicy`] (who may call what).
//!
//! Field names and meanings follow Istio's, so an Istio manifest that uses only supported fields is
//! accepted after changing its `apiVersion`. Validation lives in the generated schema (bounds,
//! enums, patterns and CEL rules), so the apiserver rejects bad input with a message naming the
//! field. [`crds()`] is the one source of the CustomResourceDefinitions; `cargo xtask codegen`
//! writes it to `crds/` and the chart. [`workload`] reads what a pod is to the mesh (its workload,
//! whether it is meshed) the same way for the injector and the operator.

mod crds;
pub mod duration;
pub mod labels;
pub mod networking;
mod schema;
pub mod security;
pub mod status;
pub mod unsupported;
pub mod workload;

pub use crds::{CrdManifest, crd_manifests, crds};
pub use duration::Duration;
pub use networking::{DestinationRule, VirtualService};
pub use security::{AuthorizationPolicy, PeerAuthentication};
pub use status::{Condition, ConditionType, Status};
