//! Weft's sidecar injector: the HTTPS edge around `weft_inject`, the pure change a pod needs (the
//! `weft-init` init container that installs traffic redirection, the `weft-proxy` sidecar, the
//! token and trust-bundle volumes, and the `weft.dev/injected` annotation that makes a second
//! pass a no-op), which `weftctl inject` uses too.
//!
//! - [`admission`] (pure): one AdmissionReview in, one out.
//! - [`server`], [`tls`], [`metrics`]: the HTTPS edge, with a hot-reloaded serving certificate.

pub mod admission;
pub mod metrics;
pub mod server;
pub mod tls;
