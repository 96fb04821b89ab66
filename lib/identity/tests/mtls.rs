//! Real rustls handshakes over an in-memory pipe with certificates from the issuer.

use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_identity::{
    CertInfo, Credentials, SpiffeId, TrustBundle, Tunnel,
    ca::Issuer,
    tls::{client_config, peer_identity, server_config, server_name},
};

const DAY: Duration = Duration::from_secs(86_400);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "prod", sa).unwrap()
}

fn creds(issuer: &Issuer, id: &SpiffeId) -> Credentials {
    let issued = issuer.issue(id, SystemTime::now(), DAY).unwrap();
    Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

fn bundle(issuer: &Issuer) -> TrustBundle {
    TrustBundle::from_pem(issuer.root_pem().as_bytes()).unwrap()
}

/// Connects `client` to `server` expecting `expect`; returns what each side saw: the server's
/// view of the client identity and ALPN, or the first error.
async fn handshake(
    client: (&Credentials, &TrustBundle),
    server: (&Credentials, &TrustBundle),
    expect: &SpiffeId,
) -> Result<(SpiffeId, Vec<u8>), String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(client_config(client.0, client.1, Tunnel::Http2).unwrap());
    let acceptor = TlsAcceptor::from(server_config(server.0, server.1).unwrap());
    let name = server_name(expect).unwrap();
    let server = async move {
        let mut tls = acceptor.accept(b).await.map_err(|e| format!("server: {e}"))?;
        let (_, conn) = tls.get_ref();
        let peer = peer_identity(conn.peer_certificates()).map_err(|e| e.to_string())?;
        let alpn = conn.alpn_protocol().unwrap_or_default().to_vec();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((peer, alpn))
    };
    let client = async move {
        let mut tls = connector.connect(name, a).await.map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| format!("client read: {e}"))?;
        assert_eq!(buf, b"pong");
        Ok::<_, String>(())
    };
    let (s, c) = tokio::join!(server, client);
    // Both sides' errors: the side that refused says why, the other only sees an alert.
    match (s, c) {
        (Ok(seen), Ok(())) => Ok(seen),
        (s, c) => Err(format!("{} | {}", s.err().unwrap_or_default(), c.err().unwrap_or_default())),
    }
}

#[tokio::test]
async fn peers_of_one_root_connect_and_see_each_others_identity() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (client_id, server_id) = (id("productpage"), id("reviews"));
    let (c, s) = (creds(&issuer, &client_id), creds(&issuer, &server_id));
    let trust = bundle(&issuer);
    assert_eq!(s.id, server_id);
    let (seen, alpn) = handshake((&c, &trust), (&s, &trust), &server_id).await.unwrap();
    assert_eq!(seen, client_id, "the server reads the client's SPIFFE ID");
    assert_eq!(alpn, b"weft/h2");
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let (c, s) = (creds(&issuer, &id("productpage")), creds(&issuer, &id("ratings")));
    let trust = bundle(&issuer);
    let err = handshake((&c, &trust), (&s, &trust), &id("reviews")).await.unwrap_err();
    assert!(err.contains("client: invalid peer certificate: NotValidForName"), "{err}");
}

#[tokio::test]
async fn certificates_from_a_foreign_root_are_refused_both_ways() {
    let ours = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let theirs = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let server_id = id("reviews");
    let good_server = creds(&ours, &server_id);
    let foreign_client = creds(&theirs, &id("productpage"));
    let err = handshake((&foreign_client, &bundle(&ours)), (&good_server, &bundle(&ours)), &server_id)
        .await
        .unwrap_err();
    assert!(err.contains("server: invalid peer certificate"), "server refuses the client: {err}");

    let foreign_server = creds(&theirs, &server_id);
    let good_client = creds(&ours, &id("productpage"));
    let err = handshake((&good_client, &bundle(&ours)), (&foreign_server, &bundle(&theirs)), &server_id)
        .await
        .unwrap_err();
    assert!(err.contains("client: invalid peer certificate"), "client refuses the server: {err}");
}

#[tokio::test]
async fn a_bundle_with_old_and_new_roots_trusts_both_during_rotation() {
    let old = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let new = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let both = TrustBundle::from_pem(format!("{}{}", new.root_pem(), old.root_pem()).as_bytes()).unwrap();
    let server_id = id("reviews");
    let s = creds(&new, &server_id);
    let c = creds(&old, &id("productpage"));
    handshake((&c, &both), (&s, &both), &server_id).await.unwrap();
}

#[test]
fn credentials_parse_validity_and_redact_the_key() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let issued = issuer.issue(&id("reviews"), SystemTime::now(), DAY).unwrap();
    let c = Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let lifetime = c.not_after.duration_since(c.not_before).unwrap();
    assert_eq!(lifetime, DAY + Duration::from_secs(60), "backdated a minute for skew");
    for debug in [format!("{c:?}"), format!("{issued:?}")] {
        assert!(!debug.contains("PRIVATE KEY") && debug.contains("redacted"), "{debug}");
    }
    let err = Credentials::from_pem(issued.cert_pem.as_bytes(), b"garbage").unwrap_err();
    assert!(!err.to_string().contains("garbage"));
    assert!(
        Credentials::from_pem(issuer.root_pem().as_bytes(), issued.key_pem.as_bytes()).is_err(),
        "a CA cert has no SPIFFE ID"
    );
    assert!(TrustBundle::from_pem(b"").is_err());
}

#[test]
fn cert_info_names_the_subject_its_issuer_and_validity() {
    let issuer = Issuer::new_root("cluster.local", SystemTime::now(), DAY).unwrap();
    let issued = issuer.issue(&id("reviews"), SystemTime::now(), DAY).unwrap();
    let leaf = &CertInfo::all_from_pem(issued.cert_pem.as_bytes()).unwrap()[0];
    let roots = bundle(&issuer).infos;
    let [root] = &roots[..] else { panic!("one root: {roots:?}") };
    assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/prod/sa/reviews"]);
    assert_eq!(leaf.issuer, root.subject, "the leaf names its root as issuer");
    assert!(root.is_ca && !leaf.is_ca);
    assert_eq!(root.subject, root.issuer, "a root issues itself");
    assert!(!leaf.serial.is_empty() && leaf.serial.chars().all(|c| c.is_ascii_hexdigit()), "{}", leaf.serial);
    let creds = Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    assert_eq!((leaf.not_before, leaf.not_after), (creds.not_before, creds.not_after));
    assert!(
        CertInfo::all_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
    );
}
