//! Protocol detection on a connection's first bytes: the HTTP/2 prior-knowledge preface, an
//! HTTP/1 request line, a TLS ClientHello, or anything else (opaque TCP). The decision is a pure function of the
//! bytes; the async part only reads them, bounded in size and time, so a server-speaks-first
//! protocol waits at most the detection timeout before it is forwarded as TCP.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weft_identity::Tunnel;

use crate::{config::Protocol, upstream::Proto};

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// A TLS record (a ClientHello): a mesh tunnel when it asks for one, else opaque.
    Tls,
    Opaque,
}

impl Detected {
    /// What a port's declared protocol makes of a connection, whatever its first bytes said.
    pub fn as_declared(self, declared: Protocol) -> Detected {
        match declared {
            Protocol::Tcp => Detected::Opaque,
            Protocol::Http1 => Detected::Http1,
            Protocol::Http2 => Detected::Http2,
            Protocol::Detect => self,
        }
    }

    /// The HTTP version to serve, or `None` for opaque TCP.
    pub fn http(self) -> Option<Proto> {
        match self {
            Detected::Http1 => Some(Proto::Http1),
            Detected::Http2 => Some(Proto::Http2),
            Detected::Tls | Detected::Opaque => None,
        }
    }
}

impl From<Tunnel> for Detected {
    /// A mesh tunnel says what it carries in its ALPN: nothing is detected twice.
    fn from(tunnel: Tunnel) -> Detected {
        match tunnel {
            Tunnel::Http1 => Detected::Http1,
            // The wire is HTTP/2 for both; behind the receiving proxy, an `Http1OverH2` tunnel's
            // requests go on as HTTP/1.1 (`ConnInfo::origin`).
            Tunnel::Http2 | Tunnel::Http1OverH2 => Detected::Http2,
            Tunnel::Tcp => Detected::Opaque,
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes read at most before deciding.
pub const MAX_DETECT_BYTES: usize = 8 * 1024;

const METHODS: [&[u8]; 9] =
    [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"CONNECT ", b"OPTIONS ", b"TRACE ", b"PATCH "];

/// Decides from the bytes so far, or `None` when more bytes could change the answer.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    match buf {
        [] | [0x16] => return None,
        // Handshake record, TLS 1.x record version.
        [0x16, 0x03, ..] => return Some(Detected::Tls),
        _ => {}
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() { Some(Detected::Http2) } else { None };
    }
    for m in METHODS {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            return if buf.len() >= m.len() { Some(Detected::Http1) } else { None };
        }
    }
    // Other methods: a token, a space, and a request line ending in HTTP/1.x.
    let token_len = buf.iter().take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_').count();
    if token_len == 0 || token_len > 32 {
        return Some(Detected::Opaque);
    }
    match buf.get(token_len) {
        None => return None,
        Some(b' ') => {}
        Some(_) => return Some(Detected::Opaque),
    }
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = &buf[..end];
            Some(if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                Detected::Http1
            } else {
                Detected::Opaque
            })
        }
        None if buf.len() >= MAX_DETECT_BYTES => Some(Detected::Opaque),
        None => None,
    }
}

/// Reads until `classify` decides, the peer closes, the buffer is full or `timeout` passes (then
/// opaque). Returns the decision and the bytes read, which the caller must replay.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> std::io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if let Some(d) = classify(&buf) {
                return Ok::<_, std::io::Error>(d);
            }
            if buf.len() >= MAX_DETECT_BYTES {
                return Ok(Detected::Opaque);
            }
            if io.read_buf(&mut buf).await? == 0 {
                // Closed before a decision: whatever arrived is forwarded as-is.
                return Ok(Detected::Opaque);
            }
        }
    };
    let detected = match tokio::time::timeout(timeout, read).await {
        Ok(result) => result?,
        Err(_) => Detected::Opaque,
    };
    Ok((detected, buf.freeze()))
}

/// Reads the rest of the HTTP/2 client preface on a connection served as HTTP/2 without
/// detection (a port that declares HTTP2, a mesh tunnel whose ALPN says h2), after `prefix` (the
/// bytes already read). Returns every byte read, for the caller to replay, or `None` when they
/// are not the preface, the peer closed, or it did not arrive within `timeout`: the connection
/// has then been closed cleanly. (h2 itself would send SETTINGS, then drop the connection with
/// the client's bytes unread, which the kernel turns into a reset; RFC 9113 section 3.4 allows
/// closing without GOAWAY, as the peer is not speaking HTTP/2.)
pub async fn h2_preface<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    prefix: Bytes,
    timeout: Duration,
) -> Option<Bytes> {
    if prefix.starts_with(H2_PREFACE) {
        return Some(prefix); // detection read it
    }
    let mut buf = BytesMut::from(&prefix[..]);
    let read = async {
        loop {
            let n = buf.len().min(H2_PREFACE.len());
            if buf[..n] != H2_PREFACE[..n] {
                return false;
            }
            if n == H2_PREFACE.len() {
                return true;
            }
            if !matches!(io.read_buf(&mut buf).await, Ok(1..)) {
                return false;
            }
        }
    };
    if tokio::time::timeout(timeout, read).await == Ok(true) {
        return Some(buf.freeze());
    }
    close_cleanly(io).await;
    None
}

/// How long, and how many bytes, a connection that is refused is read after the proxy's FIN,
/// so that the peer's unread bytes do not turn the close into a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Half-closes `io`, then reads (and drops) what the peer still sends until it closes too,
/// bounded by `LINGER` and `LINGER_BYTES`.
async fn close_cleanly<I: AsyncRead + AsyncWrite + Unpin>(io: &mut I) {
    let _ = io.shutdown().await;
    let drain = async {
        // On the heap: on the stack it would size every connection's task, refused or not.
        let mut buf = vec![0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST "), Some(Detected::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None, "a preface prefix waits for more");
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PROPFIND /x HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PROPFIND /x"), None);
        assert_eq!(classify(b"HELLO world\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Tls), "TLS ClientHello");
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"\x16\x04"), Some(Detected::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Detected::Opaque), "methods are case-sensitive");
        let long = [b'A'; MAX_DETECT_BYTES];
        assert_eq!(classify(&long), Some(Detected::Opaque));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_falls_back_to_opaque_after_the_timeout() {
        let (mut a, _b) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let (d, bytes) = detect(&mut a, Duration::from_millis(300)).await.unwrap();
        assert_eq!((d, bytes.len()), (Detected::Opaque, 0));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test]
    async fn keeps_the_bytes_it_read() {
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
        let (d, bytes) = detect(&mut a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        assert_eq!(&bytes[..], b"GET /x HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn the_h2_preface_is_read_after_what_detection_already_read() {
        let (mut a, mut b) = tokio::io::duplex(256);
        b.write_all(&H2_PREFACE[10..]).await.unwrap();
        b.write_all(b"\0\0\0\x04").await.unwrap();
        let prefix = Bytes::from_static(&H2_PREFACE[..10]);
        let read = h2_preface(&mut a, prefix, Duration::from_secs(5)).await.expect("a valid preface");
        assert!(read.starts_with(H2_PREFACE), "{read:?}");
        let full = h2_preface(&mut a, Bytes::from_static(H2_PREFACE), Duration::from_secs(5)).await;
        assert_eq!(full.as_deref(), Some(H2_PREFACE), "a complete prefix reads nothing more");
    }

    /// h2spec http2/3.5/2: an invalid preface closes the connection with a FIN (the proxy's
    /// write side ends) after reading what the client sent, never a reset.
    #[tokio::test]
    async fn an_invalid_h2_preface_closes_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(256);
        b.write_all(b"INVALID CONNECTION PREFACE\r\n\r\n").await.unwrap();
        let closing =
            tokio::spawn(async move { h2_preface(&mut a, Bytes::new(), Duration::from_secs(5)).await });
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut out)).await.unwrap().unwrap();
        assert!(out.is_empty(), "nothing is sent, not even SETTINGS: {out:?}");
        drop(b);
        assert_eq!(closing.await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_h2_preface_times_out() {
        let (mut a, _b) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        assert_eq!(h2_preface(&mut a, Bytes::new(), Duration::from_millis(300)).await, None);
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}
