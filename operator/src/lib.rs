//! Weft's control plane.
//!
//! ```text
//! kube-apiserver --watch--> controllers --Change--> index (pure, sync) --resolve--> Snapshot
//!                                                                       |  tokio::sync::watch
//!                             status writer (leader only, SSA) <--------+--------> config server (gRPC :15012)
//! ```
//!
//! - [`index`]: the watched objects and [`index::Index::resolve`], a pure function from them to
//!   per-service proxy config, inbound policies and desired status conditions.
//! - [`controllers`]: kube-runtime watchers feeding the index, with debounced publishing.
//! - [`status`]: conditions written with server-side apply on the status subresource.
//! - [`server`]: the `ConfigDiscovery` gRPC service.
//! - [`lease`]: leader election with a coordination.k8s.io Lease.
//! - [`metrics`], [`admin`]: Prometheus metrics, `/live`, `/ready`, `/metrics`.
//! - [`ca`]: the mesh CA: its Secret, the `Certificates` service (TokenReview, then sign), TLS on
//!   the gRPC port, the trust bundle ConfigMaps.
//! - [`webhook_cert`]: the injector's serving certificate and its caBundle (leader only).

#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod controllers;
pub mod index;
pub mod lease;
pub mod metrics;
pub mod run;
pub mod server;
pub mod status;
pub mod webhook_cert;

pub use run::{Config, Handle, LeaseConfig, start};
pub use webhook_cert::WebhookCertConfig;
