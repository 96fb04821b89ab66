//! Who is at the other end of a connection, as far as the mesh knows: a SPIFFE identity (when a
//! Weft proxy runs there) and the workload, for metric labels and access logs.

use std::sync::Arc;

use weft_identity::SpiffeId;

/// Who runs at an endpoint, from the config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Set when a Weft proxy runs beside the endpoint: connections to it are mesh tunnels.
    /// Behind an `Arc`: a `Peer` is cloned into per-connection and per-request state.
    pub identity: Option<Arc<SpiffeId>>,
    /// Metric labels: the identity, its namespace, the workload name (empty when unknown).
    pub principal: Arc<str>,
    pub namespace: Arc<str>,
    pub workload: Arc<str>,
}

impl Peer {
    pub fn new(identity: Option<SpiffeId>, workload: impl Into<Arc<str>>) -> Peer {
        Peer {
            principal: identity.as_ref().map_or_else(Arc::default, |id| Arc::from(id.to_string())),
            namespace: Arc::from(identity.as_ref().map_or("", SpiffeId::namespace)),
            identity: identity.map(Arc::new),
            workload: workload.into(),
        }
    }
}

/// The client of a mesh tunnel: its verified identity, the SNI it asked for, and whether its
/// HTTP/2 carries an HTTP/1.1 app's requests (ALPN `weft/h2-http1`).
#[derive(Clone, Debug)]
pub struct MeshClient {
    pub peer: Peer,
    pub sni: Option<Arc<str>>,
    pub http1_over_h2: bool,
}
