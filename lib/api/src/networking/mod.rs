//! `networking.weft.dev/v1alpha1`: traffic routing and per-destination policy.

mod common;
mod destination_rule;
mod virtual_service;

pub use common::{Destination, HeaderOperations, Headers, Percent, PortSelector, StringMatch};
pub use destination_rule::*;
pub use virtual_service::*;

/// The API group of the networking resources.
pub const GROUP: &str = "networking.weft.dev";
