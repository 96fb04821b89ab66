//! Weft's test cluster: a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) and one real node (containerd, kubelet, kube-proxy
//! in a network namespace, CoreDNS), run as host processes, and the helpers the tests use.
//!
//! - [`cluster`] is the lifecycle behind `cargo xtask cluster up|down|status|env`: it builds the
//!   pinned upstream binaries once (`e2e/cluster/build.sh`), generates the PKI, starts the
//!   components detached from the calling process, and installs Weft's CRDs; [`node`] is the
//!   node's part of it.
//! - [`images`] builds OCI images from this host's files and imports them into the node.
//! - [`mesh`] installs the chart with those images and drives the demo app on the node.
//! - [`walkthrough`] is the demo's steps: Istio YAML applied to the meshed apps, each step's
//!   traffic measured and checked (`cargo xtask demo`, `tests/walkthrough.rs`).
//! - [`apply`] applies YAML streams as `kubectl apply --server-side` does.
//! - [`http`] is a bounded `GET` for admin endpoints and test origins.
//! - [`webhook`] runs Weft's injector in the calling process, registered with the apiserver by
//!   URL, for the injection tests and the admission benchmark.
//! - [`TestCluster`] gives tests a [`kube::Client`] for the running cluster and a temporary
//!   namespace per test. It never starts a cluster and never skips: without one, it fails
//!   with the command to run.
//!
//! See `e2e/README.md` for how to use it.

#![forbid(unsafe_code)]

pub mod apply;
pub mod cluster;
pub mod helm;
pub mod http;
pub mod images;
pub mod mesh;
pub mod node;
mod pki;
mod process;
mod test_cluster;
pub mod walkthrough;
pub mod webhook;

pub use cluster::Error;
pub use test_cluster::{TEST_NAMESPACE_LABEL, TestCluster, TestNamespace};
