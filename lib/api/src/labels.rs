//! Labels and annotations Weft reads or writes on Kubernetes objects.

/// Namespace label that turns sidecar injection on (`enabled`).
pub const INJECT_LABEL: &str = "weft.dev/inject";
/// Pod annotation that turns injection off for one pod (`"false"`).
pub const INJECT_ANNOTATION: &str = "weft.dev/inject";
/// Pod annotation written by the injector; its presence makes injection a no-op.
pub const INJECTED_ANNOTATION: &str = "weft.dev/injected";
/// Pod annotations that exclude ports or CIDRs from traffic redirection.
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "weft.dev/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS_ANNOTATION: &str = "weft.dev/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS_ANNOTATION: &str = "weft.dev/exclude-outbound-cidrs";
/// Pod annotations that override the proxy's resource requests.
pub const PROXY_CPU_ANNOTATION: &str = "weft.dev/proxy-cpu";
pub const PROXY_MEMORY_ANNOTATION: &str = "weft.dev/proxy-memory";
/// Pod annotation: `"false"` keeps the app's probes as written (Istio's equivalent is
/// `sidecar.istio.io/rewriteAppHTTPProbers`); `"true"`, the default, points them at the proxy.
pub const REWRITE_APP_PROBES_ANNOTATION: &str = "weft.dev/rewrite-app-probes";
/// AuthorizationPolicy annotation: `"true"` makes the policy a dry run, evaluated and counted by
/// the proxies but never enforced. Istio's spelling, [`ISTIO_DRY_RUN_ANNOTATION`], works too.
pub const DRY_RUN_ANNOTATION: &str = "weft.dev/dry-run";
pub const ISTIO_DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// The field manager the operator uses for server-side apply.
pub const FIELD_MANAGER: &str = "weft-operator";
