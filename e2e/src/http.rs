//! A minimal HTTP/1.1 client for admin endpoints and test origins: one `GET` per connection,
//! bounded in time, so a server that accepts and never answers fails the caller instead of
//! hanging it. And the smallest origin: a server answering every request with one body.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one exchange may take, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GET {path} from {addr}: {source}")]
    Io { addr: SocketAddr, path: String, source: std::io::Error },
    #[error("GET {path} from {addr}: no answer within {TIMEOUT:?}")]
    Timeout { addr: SocketAddr, path: String },
    #[error("GET {path} from {addr}: no HTTP status line in {head:?}")]
    NoStatus { addr: SocketAddr, path: String, head: String },
}

/// `GET path` with `Host: host` and `connection: close`: the status and the body (as text).
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String), Error> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout { addr, path: path.to_owned() })?
        .map_err(|source| Error::Io { addr, path: path.to_owned(), source })?;
    let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| Error::NoStatus {
        addr,
        path: path.to_owned(),
        head: text.chars().take(40).collect(),
    })?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// A server on loopback that answers every request (keep-alive) with 200 and `body`; runs until
/// the runtime ends. Tests and the demo put it behind proxies.
pub async fn serve_ok(body: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}
