//! The issuer's certificates, parsed back with x509-parser: what an X.509-SVID must be (one URI
//! SAN, not a CA, digitalSignature only, server and client auth, the asked lifetime), what a
//! certificate request may not do (name another identity, use another key type), and a plug-in
//! intermediate whose leaves chain to the user's root.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_identity::{
    Credentials, SpiffeId, TrustBundle,
    ca::{Error, Issuer},
    request,
};
use x509_parser::{extensions::GeneralName, pem::Pem, prelude::*};

const DAY: Duration = Duration::from_secs(86_400);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

fn first_der(pem: &str) -> Vec<u8> {
    Pem::iter_from_buffer(pem.as_bytes()).next().unwrap().unwrap().contents
}

#[test]
fn a_signed_request_is_an_x509_svid_for_the_callers_identity_only() {
    let now = SystemTime::now();
    let ca = Issuer::new_root("cluster.local", now, 3650 * DAY).unwrap();
    let asked = request::generate(Some(&id("reviews"))).unwrap();
    let chain = ca.sign_request(&asked.request_der, &id("reviews"), now, DAY).unwrap().chain_pem;

    let der = first_der(&chain);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
        .collect();
    assert_eq!(uris, ["spiffe://cluster.local/ns/shop/sa/reviews"]);
    assert!(leaf.subject().iter().next().is_none(), "empty subject");
    assert!(san.critical, "with an empty subject the SAN extension is critical");
    assert!(!leaf.is_ca());
    let usage = leaf.key_usage().unwrap().unwrap();
    assert!(usage.critical);
    assert!(usage.value.digital_signature());
    assert!(!usage.value.key_cert_sign() && !usage.value.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let validity = leaf.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert_eq!(lifetime, 86_400 + 60, "the asked lifetime, backdated by one minute of skew");
    let issued_at = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(validity.not_before.timestamp(), issued_at - 60);
    let key = rcgen::KeyPair::from_pem(&asked.key_pem).unwrap();
    assert_eq!(leaf.public_key().subject_public_key.data.as_ref(), key.public_key_raw(), "the request's key");

    // The chain and the key load as credentials, and the root verifies them.
    let creds = Credentials::from_pem(chain.as_bytes(), asked.key_pem.as_bytes()).unwrap();
    assert_eq!(creds.id, id("reviews"));
    assert_eq!(creds.chain.len(), 2, "leaf, then the CA");
    TrustBundle::from_pem(ca.root_pem().as_bytes()).unwrap();

    // A request without names gets the caller's identity too.
    let anonymous = request::generate(None).unwrap();
    let chain = ca.sign_request(&anonymous.request_der, &id("ratings"), now, DAY).unwrap().chain_pem;
    let creds = Credentials::from_pem(chain.as_bytes(), anonymous.key_pem.as_bytes()).unwrap();
    assert_eq!(creds.id, id("ratings"));
}

#[test]
fn requests_naming_another_identity_or_extra_names_or_garbage_are_refused() {
    let now = SystemTime::now();
    let ca = Issuer::new_root("cluster.local", now, 3650 * DAY).unwrap();
    let other = request::generate(Some(&id("admin"))).unwrap();
    let err = ca.sign_request(&other.request_der, &id("reviews"), now, DAY).unwrap_err();
    assert!(matches!(err, Error::RequestNames { .. }), "{err}");
    assert!(err.to_string().contains("spiffe://cluster.local/ns/shop/sa/admin"), "{err}");

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(id("reviews").to_string().try_into().unwrap()));
    let extra = params.serialize_request(&key).unwrap();
    let err = ca.sign_request(extra.der(), &id("reviews"), now, DAY).unwrap_err();
    assert!(err.to_string().contains("DNS:evil.example"), "{err}");

    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let request = rcgen::CertificateParams::default().serialize_request(&ed).unwrap();
    let err = ca.sign_request(request.der(), &id("reviews"), now, DAY).unwrap_err();
    assert!(err.to_string().contains("ECDSA P-256"), "{err}");

    let mut forged = other.request_der.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(matches!(ca.sign_request(&forged, &id("admin"), now, DAY), Err(Error::Request(_))));
    assert!(matches!(ca.sign_request(b"garbage", &id("admin"), now, DAY), Err(Error::Request(_))));
}

#[test]
fn a_leaf_never_outlives_its_ca_and_an_expired_ca_signs_nothing() {
    let now = SystemTime::now();
    let ca = Issuer::new_root("cluster.local", now, DAY).unwrap();
    let asked = request::generate(None).unwrap();
    let chain = ca.sign_request(&asked.request_der, &id("reviews"), now, 30 * DAY).unwrap().chain_pem;
    let creds = Credentials::from_pem(chain.as_bytes(), asked.key_pem.as_bytes()).unwrap();
    let cut = ca.not_after().duration_since(creds.not_after).unwrap();
    assert!(cut < Duration::from_secs(1), "the leaf ends with its CA (to the second): {cut:?}");
    let later = now + 2 * DAY;
    assert!(matches!(
        ca.sign_request(&asked.request_der, &id("reviews"), later, DAY),
        Err(Error::Expired(_))
    ));
}

#[test]
fn a_plug_in_intermediate_signs_leaves_that_chain_to_the_users_root() {
    let now = SystemTime::now();
    // The user's offline root signs an intermediate for the mesh.
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.distinguished_name.push(rcgen::DnType::CommonName, "corp root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let mesh_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut mesh_params = rcgen::CertificateParams::default();
    mesh_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    mesh_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    mesh_params.distinguished_name.push(rcgen::DnType::CommonName, "mesh intermediate");
    let intermediate = mesh_params.signed_by(&mesh_key, &root_issuer).unwrap();

    let ca = Issuer::from_pem(&intermediate.pem(), &mesh_key.serialize_pem(), "", &root.pem()).unwrap();
    assert_eq!(ca.root_pem(), root.pem());
    let asked = request::generate(None).unwrap();
    let chain = ca.sign_request(&asked.request_der, &id("reviews"), now, DAY).unwrap().chain_pem;
    let creds = Credentials::from_pem(chain.as_bytes(), asked.key_pem.as_bytes()).unwrap();
    assert_eq!(creds.chain.len(), 2, "leaf, then the intermediate");
    let (_, leaf) = X509Certificate::from_der(creds.chain[0].as_ref()).unwrap();
    let (_, mid) = X509Certificate::from_der(creds.chain[1].as_ref()).unwrap();
    assert_eq!(leaf.issuer(), mid.subject());
    assert!(leaf.verify_signature(Some(mid.public_key())).is_ok());
    assert!(format!("{ca:?}").contains("mesh intermediate"));
    assert!(!format!("{ca:?}").contains("PRIVATE"), "Debug never shows the key");

    // A key that does not match, or a certificate that is no CA, is refused with the reason.
    let wrong = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let err = Issuer::from_pem(&intermediate.pem(), &wrong.serialize_pem(), "", &root.pem()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    let err = Issuer::from_pem(&root.pem(), "not a key", "", &root.pem()).unwrap_err();
    assert!(matches!(err, Error::Key));
    // Roots that did not sign the intermediate: refused, not published as a bundle.
    let stranger = Issuer::new_root("cluster.local", now, DAY).unwrap();
    let err = Issuer::from_pem(&intermediate.pem(), &mesh_key.serialize_pem(), "", stranger.root_pem())
        .unwrap_err();
    assert!(err.to_string().contains("does not chain"), "{err}");
    let leaf_pem = chain.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap();
    let err = Issuer::from_pem(leaf_pem, &asked.key_pem, "", &root.pem()).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
}
