//! Weft's data plane: a sidecar proxy for HTTP/1.1, HTTP/2, gRPC and opaque TCP.
//!
//! Layout, from the edge inward: `app` binds listeners and hands each connection to `detect`,
//! then to `http::server` (hyper) or `tcp` (splice). HTTP requests pass through tower layers
//! (`http::observe`, `http::headers::RequestIdLayer`) to `http::router`, which asks the pure
//! `route` and `balance` functions what to do against the current `config::Snapshot`, and sends
//! upstream through `upstream` connection pools. `tls` holds the mesh identity and both ends of
//! the mTLS tunnels between proxies; `certify` gets its certificate from the mesh CA over
//! `grpc` (the TLS channel to the operator). `admin` serves health, config and metrics.

pub mod admin;
pub mod app;
pub mod balance;
pub mod certify;
pub mod config;
pub mod conn;
pub mod destinations;
pub mod detect;
pub mod explain;
pub mod grpc;
pub mod h2_frames;
pub mod http;
pub mod inbound;
pub mod io;
pub mod iptables;
pub mod log_limit;
pub mod metrics;
pub mod peer;
pub mod probes;
pub mod resilience;
pub mod route;
pub mod settings;
pub mod sys;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod wait;

pub use app::{Handle, start};
pub use settings::Settings;
