//! `weftctl`, Weft's command line, as a library so the end-to-end tests run its commands
//! against the real cluster. Each command is a module: a fetch at the edge (the apiserver, or a
//! proxy's admin port through the apiserver's pod proxy), pure work in the middle, and a
//! `render_table` for people (`-o json|yaml` print the same data whole, `output`).
//!
//! - `inject`: the webhook's injection offline (`weft-inject`).
//! - `check`: is the mesh healthy?
//! - `stat`: rps, success rate and latency from the proxies' metrics.
//! - `proxy_config`, `identity`: what a proxy runs and who it is.
//! - `explain`: what a proxy would do with a request, by its own decision code.

pub mod check;
pub mod cluster;
pub mod explain;
pub mod identity;
pub mod inject;
pub mod output;
pub mod proxy_config;
pub mod stat;
