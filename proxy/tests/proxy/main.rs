//! The proxy in-process on loopback (tier 2): real TCP, real hyper clients and backends, the
//! config loaded from a file. One test binary, so the suite links once.

mod support;

mod admin;
mod authz;
mod h2spec;
mod hardening;
mod lifecycle;
mod mtls;
mod probes;
mod protocols;
mod resilience;
mod routing;
