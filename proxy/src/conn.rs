//! Where a downstream connection came in and where it was going: what every layer above the
//! listeners (protocol detection, the HTTP server and router, the TCP splice) is told about it.

use std::net::SocketAddr;

/// Where a connection came from and where it was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    Explicit,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Explicit => "explicit",
        }
    }
}

/// A downstream connection as accepted.
#[derive(Clone, Debug)]
pub struct Conn {
    pub direction: Direction,
    pub peer: SocketAddr,
    /// The original destination of a redirected connection.
    pub dst: Option<SocketAddr>,
    /// An explicit listener's fixed destination (`host`, `port`).
    pub target: Option<(String, u16)>,
}

impl Conn {
    /// The port the client was going to.
    pub fn port(&self) -> Option<u16> {
        self.dst.map(|d| d.port()).or(self.target.as_ref().map(|t| t.1))
    }
}
