//! Mesh identity: SPIFFE IDs (`spiffe`), a workload's credentials and the trust bundle
//! (`credentials`), and the rustls configurations proxies use for mTLS between them (`tls`).
//! With feature `ca`, the issuer that signs workload certificates (`ca`); with feature
//! `request`, a workload's key and certificate request (`request`).
//!
//! Pure and synchronous: loading files, renewing and serving certificates belong to the
//! binaries that use it.

#[cfg(feature = "ca")]
pub mod ca;
pub mod credentials;
#[cfg(feature = "request")]
pub mod request;
pub mod spiffe;
pub mod tls;

pub use credentials::{CertInfo, Credentials, TrustBundle};
pub use spiffe::SpiffeId;
pub use tls::Tunnel;
