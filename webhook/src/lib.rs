//! Weft's sidecar injector.
//!
//! - [`inject`] (pure): the change a pod needs: the `weft-init` init container that installs
//!   traffic redirection, the `weft-proxy` sidecar, the token and trust-bundle volumes, and the
//!   `weft.dev/injected` annotation that makes a second pass a no-op. `weftctl inject` uses it too.
//! - [`admission`] (pure): one AdmissionReview in, one out.
//! - [`server`], [`tls`], [`metrics`]: the HTTPS edge, with a hot-reloaded serving certificate.

pub mod admission;
pub mod config;
pub mod inject;
pub mod metrics;
pub mod server;
pub mod tls;

pub use config::InjectConfig;
pub use inject::{InjectError, Injection, SkipReason, inject, inject_into};
