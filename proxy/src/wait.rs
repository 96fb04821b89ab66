//! `weft-proxy wait`: returns once the proxy beside it is ready. Without native sidecars the
//! injector runs it as the proxy container's postStart hook, and Kubernetes starts the app
//! containers only after the hook returns.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, sleep, timeout},
};

/// How often `/ready` is asked while the proxy starts.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("the proxy at {admin} was not ready after {waited:?} (last answer: {last})")]
pub struct NotReady {
    pub admin: SocketAddr,
    pub waited: Duration,
    pub last: String,
}

/// Asks `GET /ready` on the admin server until it answers 200, for at most `deadline`.
pub async fn until_ready(admin: SocketAddr, deadline: Duration) -> Result<(), NotReady> {
    let started = Instant::now();
    loop {
        let last = match timeout(POLL * 10, ready_status(admin)).await {
            Ok(Ok(200)) => return Ok(()),
            Ok(Ok(status)) => format!("HTTP {status}"),
            Ok(Err(error)) => error.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        if started.elapsed() >= deadline {
            return Err(NotReady { admin, waited: deadline, last });
        }
        sleep(POLL).await;
    }
}

async fn ready_status(admin: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(admin).await?;
    stream.write_all(b"GET /ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// An admin stand-in that answers 503 `not_ready_for` times, then 200.
    async fn admin(not_ready_for: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for answered in 0.. {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let status = if answered < not_ready_for { "503 Service Unavailable" } else { "200 OK" };
                let _ = stream
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        address
    }

    #[tokio::test]
    async fn returns_once_ready_answers_200() {
        until_ready(admin(3).await, Duration::from_secs(10)).await.unwrap();
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_saying_what_it_last_saw() {
        let error = until_ready(admin(usize::MAX).await, Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(error.last, "HTTP 503");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = listener.local_addr().unwrap();
        drop(listener);
        let error = until_ready(closed, Duration::from_millis(300)).await.unwrap_err();
        assert!(error.last.contains("refused"), "{}", error.last);
    }
}
