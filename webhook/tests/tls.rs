//! The serving certificate is hot-reloaded: a renewed pair is served on the next handshake
//! without a restart, and a broken pair is refused while the old one keeps serving.

use std::{fs, path::PathBuf, sync::Arc};

use rcgen::{CertificateParams, KeyPair};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsConnector;
use weft_inject::InjectConfig;
use weft_webhook::{
    server::{AppState, router, serve_tls},
    tls::CertStore,
};

struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn self_signed(common_name: &str) -> Pair {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    let cert = params.self_signed(&key).unwrap();
    Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-webhook-{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Connects, says GET /healthz, and returns the certificate the server presented and its answer.
async fn fetch(address: std::net::SocketAddr, trusted: &[&Pair]) -> (CertificateDer<'static>, String) {
    let mut roots = RootCertStore::empty();
    for pair in trusted {
        roots.add(pair.der.clone()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = TcpStream::connect(address).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    (presented, answer)
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = scratch_dir("reload");
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (first, second) = (self_signed("first"), self_signed("second"));
    fs::write(&cert_path, &first.cert_pem).unwrap();
    fs::write(&key_path, &first.key_pem).unwrap();

    let certs = Arc::new(CertStore::load(&cert_path, &key_path).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(serve_tls(
        listener,
        certs.clone(),
        router(AppState::new(InjectConfig::default())),
        stopped,
    ));

    let (presented, answer) = fetch(address, &[&first, &second]).await;
    assert_eq!(presented, first.der);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");
    assert!(!certs.reload_if_changed().unwrap(), "unchanged files are not a renewal");

    fs::write(&cert_path, &second.cert_pem).unwrap();
    fs::write(&key_path, &second.key_pem).unwrap();
    assert!(certs.reload_if_changed().unwrap());
    assert_eq!(fetch(address, &[&first, &second]).await.0, second.der);

    // Half-written renewal: the new certificate with the old key. Refused; the last good pair serves.
    fs::write(&cert_path, &first.cert_pem).unwrap();
    let error = certs.reload_if_changed().unwrap_err();
    assert!(error.to_string().contains("does not fit"), "{error}");
    assert_eq!(fetch(address, &[&first, &second]).await.0, second.der);

    stop.send(true).unwrap();
    server.await.unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unusable_files_are_refused_at_start_with_the_path() {
    let dir = scratch_dir("bad");
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    let pair = self_signed("only");
    fs::write(&cert_path, "not a certificate").unwrap();
    fs::write(&key_path, &pair.key_pem).unwrap();
    let error = CertStore::load(&cert_path, &key_path).unwrap_err();
    assert!(error.to_string().contains("tls.crt holds no PEM certificate"), "{error}");
    let error = CertStore::load(dir.join("missing.crt"), &key_path).unwrap_err();
    assert!(error.to_string().contains("missing.crt"), "{error}");
    fs::remove_dir_all(dir).unwrap();
}
