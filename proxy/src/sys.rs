//! Operating-system specifics, the one place the workspace allows `unsafe`. `SO_ORIGINAL_DST`
//! (the address a connection was sent to before iptables REDIRECTed it to the proxy) is read
//! through socket2's safe wrapper of `getsockopt`; [`release_free_memory`] is the one `unsafe`
//! call.

use std::{io, net::SocketAddr};

use socket2::SockRef;
use tokio::net::TcpStream;

/// The original destination of a redirected connection (Linux only).
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "original destination is not an IP address")
    })
}

#[cfg(not(target_os = "linux"))]
pub fn original_dst(_stream: &TcpStream) -> io::Result<SocketAddr> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "SO_ORIGINAL_DST needs Linux"))
}

/// Hands the allocator's free pages back to the kernel (glibc's `malloc_trim`). glibc returns
/// only the top of a heap on its own, so after a burst of connections the pages they freed in the
/// middle stay resident; this releases every whole free page. Returns whether any was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointers; it locks and walks glibc's own arenas, and 0 (keep
    // no extra padding) is a valid argument.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl's) return free memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Without an iptables redirect the kernel has no original destination for the socket (the
    /// conntrack entry is not a NAT one), so the call fails cleanly rather than inventing one.
    #[tokio::test]
    async fn fails_cleanly_without_a_redirect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        match original_dst(&server) {
            // Some kernels report the local address when conntrack tracks the flow unNATed.
            Ok(dst) => assert_eq!(dst, addr),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(2) | Some(92)) || e.kind() == io::ErrorKind::NotFound,
                "{e:?}"
            ),
        }
    }
}
