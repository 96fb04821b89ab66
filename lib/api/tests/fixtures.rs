//! Realistic Istio-style manifests (with only `apiVersion` changed) are accepted and survive a
//! round trip through the Rust types; bad ones are rejected with errors naming the field.

mod support;

use serde_json::Value;
use support::{fixtures, normalize_numbers, schema_errors};
use weft_api::{AuthorizationPolicy, DestinationRule, PeerAuthentication, VirtualService};

fn round_trip(object: &Value) -> Value {
    fn through<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) -> Value {
        let typed: T = serde_json::from_value(object.clone()).unwrap();
        serde_json::to_value(typed).unwrap()
    }
    match object["kind"].as_str().unwrap() {
        "VirtualService" => through::<VirtualService>(object),
        "DestinationRule" => through::<DestinationRule>(object),
        "PeerAuthentication" => through::<PeerAuthentication>(object),
        "AuthorizationPolicy" => through::<AuthorizationPolicy>(object),
        other => panic!("unexpected kind {other}"),
    }
}

#[test]
fn valid_fixtures_pass_the_schema() {
    for fixture in fixtures("valid") {
        let errors = schema_errors(&fixture.object);
        assert!(errors.is_empty(), "{} was rejected: {errors:#?}", fixture.name);
    }
}

#[test]
fn valid_fixtures_round_trip_through_the_types_unchanged() {
    for fixture in fixtures("valid") {
        let mut sent = fixture.object.clone();
        let mut back = round_trip(&fixture.object);
        normalize_numbers(&mut sent);
        normalize_numbers(&mut back);
        assert_eq!(back, sent, "{} changed in a round trip (an unknown or renamed field?)", fixture.name);
    }
}

#[test]
fn invalid_fixtures_are_rejected_naming_the_field() {
    for fixture in fixtures("invalid") {
        let expect =
            fixture.expect.as_deref().unwrap_or_else(|| panic!("{} has no `# expect:` line", fixture.name));
        let errors = schema_errors(&fixture.object);
        assert!(
            errors.iter().any(|error| error.starts_with(&format!("{expect}: "))),
            "{}: expected an error at {expect}, got {errors:#?}",
            fixture.name
        );
    }
}

#[test]
fn unknown_enum_values_fail_to_parse_into_the_types() {
    let invalid = fixtures("invalid");
    let unknown_mode = invalid.iter().find(|f| f.name == "pa-unknown-mode.yaml").unwrap();
    let error = serde_json::from_value::<PeerAuthentication>(unknown_mode.object.clone()).unwrap_err();
    assert!(error.to_string().contains("unknown variant `MUTUAL`"), "{error}");
}
