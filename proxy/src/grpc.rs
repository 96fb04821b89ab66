//! The gRPC channel to the operator (port 15012): TLS, the server checked by DNS name against
//! the mesh's trust bundle, this proxy's certificate presented when it has one.

use std::{sync::Arc, time::Duration};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid control-plane address {addr:?}: {source}")]
    Address { addr: String, source: tonic::transport::Error },
    #[error("invalid control-plane server name {0:?}")]
    ServerName(String),
    #[error("connecting to the control plane at {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
}

/// The DNS name a `host:port` address is checked against: its host.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host).trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `addr` (`host:port`) over TLS, expecting a certificate for `server_name`.
pub async fn connect(addr: &str, server_name: &str, tls: Arc<ClientConfig>) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| Error::Address { addr: addr.to_owned(), source })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| Error::ServerName(server_name.to_owned()))?;
    let connector = TlsConnector::from(tls);
    let connect = tower::service_fn(move |uri: Uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let host =
                uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(15012);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connect)
        .await
        .map_err(|source| Error::Connect { addr: addr.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_of_an_address_is_its_dns_name() {
        assert_eq!(host_of("weft-operator.weft-system.svc:15012"), "weft-operator.weft-system.svc");
        assert_eq!(host_of("[::1]:15012"), "::1");
        assert_eq!(host_of("operator"), "operator");
    }
}
