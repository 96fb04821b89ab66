//! M5's load client: full TLS 1.3 handshakes with a client certificate against one server, from
//! a few blocking worker threads, for a fixed time and at most a fixed count.
//!
//! Every connection is new and resumption is off, so each one costs the server a full handshake
//! (key exchange, its signature, and checking the client's chain and signature). After its side
//! of the handshake the client sends close_notify and waits for the server to close: the server
//! reads that alert only after the client's last flight, so by then it has checked the client's
//! certificate, and a refusal arrives here as an alert and counts as an error.

use std::{
    collections::BTreeMap,
    io::{self, Read as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rustls::{ClientConfig, ClientConnection, client::Resumption, pki_types::ServerName};

/// One M5 run.
#[derive(Clone, Debug)]
pub struct Load {
    pub addr: SocketAddr,
    pub config: Arc<ClientConfig>,
    /// SNI; for a mesh client config, also the identity the server's certificate must carry.
    pub server_name: ServerName<'static>,
    pub workers: usize,
    pub duration: Duration,
    /// Connections started at most, over all workers.
    pub max_handshakes: u64,
    /// For each connect, read and write; a server that stalls fails the connection, not the run.
    pub io_timeout: Duration,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Handshakes completed and closed cleanly.
    pub handshakes: u64,
    pub errors: u64,
    /// Error messages and how often each occurred (at most [`MAX_ERROR_KINDS`] kinds).
    pub error_kinds: BTreeMap<String, u64>,
    /// From the start of the run to the end of its last connection.
    pub elapsed: Duration,
}

pub const MAX_ERROR_KINDS: usize = 8;

/// `config` with resumption off, so that every connection makes a full handshake.
pub fn without_resumption(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// Runs `load` to its end: `duration` elapsed or `max_handshakes` started, whichever comes
/// first. A connection in progress at the deadline finishes (within `io_timeout` per step).
pub fn run(load: &Load) -> Outcome {
    let started = AtomicU64::new(0);
    let ok = AtomicU64::new(0);
    let errors = Mutex::new(BTreeMap::<String, u64>::new());
    let failed = AtomicU64::new(0);
    let t0 = Instant::now();
    let deadline = t0 + load.duration;
    thread::scope(|s| {
        for _ in 0..load.workers.max(1) {
            s.spawn(|| {
                while Instant::now() < deadline
                    && started.fetch_add(1, Ordering::Relaxed) < load.max_handshakes
                {
                    match handshake(load) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut kinds = errors.lock().unwrap_or_else(|e| e.into_inner());
                            let message = e.to_string();
                            if kinds.contains_key(&message) || kinds.len() < MAX_ERROR_KINDS {
                                *kinds.entry(message).or_default() += 1;
                            }
                        }
                    }
                }
            });
        }
    });
    Outcome {
        handshakes: ok.into_inner(),
        errors: failed.into_inner(),
        error_kinds: errors.into_inner().unwrap_or_else(|e| e.into_inner()),
        elapsed: t0.elapsed(),
    }
}

/// Rounds of reads or writes one connection may take; a handshake needs a handful.
const MAX_STEPS: usize = 32;

fn handshake(load: &Load) -> io::Result<()> {
    let mut sock = TcpStream::connect_timeout(&load.addr, load.io_timeout)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(load.io_timeout))?;
    sock.set_write_timeout(Some(load.io_timeout))?;
    let mut conn =
        ClientConnection::new(load.config.clone(), load.server_name.clone()).map_err(io::Error::other)?;
    let mut steps = 0;
    while conn.is_handshaking() {
        steps += 1;
        if steps > MAX_STEPS {
            return Err(io::Error::other("handshake did not finish"));
        }
        conn.complete_io(&mut sock)?;
    }
    // Our last flight (certificate, its signature, Finished) may still be queued; then the
    // close_notify, which the server reads only after that flight.
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    for _ in 0..MAX_STEPS {
        if conn.read_tls(&mut sock)? == 0 {
            // Closed without close_notify (not every server sends one): the handshake is done
            // on both sides, which is all that is measured.
            return Ok(());
        }
        let state = conn.process_new_packets().map_err(io::Error::other)?;
        if state.peer_has_closed() {
            // Wait for the server's FIN too, so the server closes first and the TIME_WAIT is
            // its own, not one of this machine's ephemeral ports.
            let mut rest = [0u8; 256];
            for _ in 0..MAX_STEPS {
                if sock.read(&mut rest)? == 0 {
                    return Ok(());
                }
            }
            return Err(io::Error::other("data after close_notify"));
        }
    }
    Err(io::Error::other("server did not close"))
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{TcpListener, TcpStream},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        thread,
        time::{Duration, SystemTime},
    };

    use rustls::{ServerConfig, ServerConnection};
    use weft_identity::{
        Credentials, SpiffeId, TrustBundle, Tunnel,
        ca::{Issued, Issuer},
        tls,
    };

    use super::{Load, run, without_resumption};

    const DAY: Duration = Duration::from_secs(86_400);

    fn creds(issued: &Issued) -> Credentials {
        Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
    }

    /// A blocking mesh-mTLS server answering one connection at a time as the proxies do for
    /// M5: handshake, then close on the client's close_notify. Stops when `stop` is set.
    fn serve(listener: TcpListener, config: Arc<ServerConfig>, stop: Arc<AtomicBool>) {
        listener.set_nonblocking(true).unwrap();
        while !stop.load(Ordering::Relaxed) {
            let mut sock = match listener.accept() {
                Ok((sock, _)) => sock,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            let _ = one_connection(&mut sock, config.clone());
        }
    }

    fn one_connection(sock: &mut TcpStream, config: Arc<ServerConfig>) -> io::Result<()> {
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        for _ in 0..32 {
            if conn.read_tls(sock)? == 0 {
                break;
            }
            let state = conn.process_new_packets();
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
            if state.map_err(io::Error::other)?.peer_has_closed() {
                conn.send_close_notify();
                while conn.wants_write() {
                    conn.write_tls(sock)?;
                }
                break;
            }
        }
        Ok(())
    }

    /// Runs the client for a moment against a server with `server` credentials; the client
    /// presents `client` credentials and trusts `client_roots`.
    fn against(server: (&Issued, &str), client: (&Issued, &str)) -> super::Outcome {
        let server_config =
            tls::server_config(&creds(server.0), &TrustBundle::from_pem(server.1.as_bytes()).unwrap())
                .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = thread::spawn({
            let stop = stop.clone();
            move || serve(listener, server_config, stop)
        });
        let client_config = tls::client_config(
            &creds(client.0),
            &TrustBundle::from_pem(client.1.as_bytes()).unwrap(),
            Tunnel::Http1,
        )
        .unwrap();
        let id = SpiffeId::new("cluster.local", "bench", "inbound").unwrap();
        let outcome = run(&Load {
            addr,
            config: without_resumption(client_config),
            server_name: tls::server_name(&id).unwrap(),
            workers: 2,
            duration: Duration::from_millis(300),
            max_handshakes: 50,
            io_timeout: Duration::from_secs(2),
        });
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        outcome
    }

    #[test]
    fn counts_full_handshakes_until_the_bound() {
        let now = SystemTime::now();
        let ca = Issuer::new_root("cluster.local", now, DAY).unwrap();
        let id = |sa| SpiffeId::new("cluster.local", "bench", sa).unwrap();
        let inbound = ca.issue(&id("inbound"), now, DAY).unwrap();
        let outbound = ca.issue(&id("outbound"), now, DAY).unwrap();
        let outcome = against((&inbound, ca.root_pem()), (&outbound, ca.root_pem()));
        assert_eq!((outcome.errors, &outcome.error_kinds), (0, &Default::default()));
        // 300 ms is ample for 50 handshakes; the count bound ends the run first.
        assert_eq!(outcome.handshakes, 50);
    }

    #[test]
    fn a_refused_client_certificate_is_an_error() {
        let now = SystemTime::now();
        let ca = Issuer::new_root("cluster.local", now, DAY).unwrap();
        let other = Issuer::new_root("cluster.local", now, DAY).unwrap();
        let id = |sa| SpiffeId::new("cluster.local", "bench", sa).unwrap();
        let inbound = ca.issue(&id("inbound"), now, DAY).unwrap();
        // Signed by a root the server does not trust; the client trusts the server's root, so
        // its own handshake completes and only the server's refusal can fail it.
        let stranger = other.issue(&id("outbound"), now, DAY).unwrap();
        let outcome = against((&inbound, ca.root_pem()), (&stranger, ca.root_pem()));
        assert_eq!(outcome.handshakes, 0);
        assert!(outcome.errors > 0 && !outcome.error_kinds.is_empty(), "{outcome:?}");
    }
}
