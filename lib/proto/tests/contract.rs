//! The contract's three encodings (protobuf, JSON, YAML) describe the same message.

use prost::Message as _;
use weft_proto::v1::{
    LoadBalancer, Protocol, ProxyConfig, StringMatch, load_balancer::Policy, string_match::Kind,
};

const YAML: &str = r#"
version: "v42"
services:
  - name: reviews.default.svc.cluster.local
    aliases: [reviews]
    addresses: ["10.96.0.10"]
    ports:
      - number: 9080
        protocol: HTTP1
        endpoints:
          - address: "10.1.0.5:9080"
            labels: {version: v1}
          - address: "10.1.0.6:9080"
            labels: {version: v2}
    subsets:
      - name: v1
        labels: {version: v1}
    trafficPolicy:
      loadBalancer: {policy: ROUND_ROBIN}
    httpRoutes:
      - name: canary
        matches:
          - uri: {prefix: /api}
            headers:
              x-user: {exact: jason}
        route:
          - destination: {host: reviews, subset: v1}
            weight: 90
          - destination: {host: reviews}
            weight: 10
        timeoutMs: 1500
"#;

#[test]
fn yaml_json_and_protobuf_agree() {
    let from_yaml: ProxyConfig = serde_yaml::from_str(YAML).expect("yaml parses");
    let svc = &from_yaml.services[0];
    assert_eq!(svc.ports[0].protocol(), Protocol::Http1);
    assert_eq!(
        svc.traffic_policy.as_ref().and_then(|t| t.load_balancer.as_ref()).map(|l| l.policy()),
        Some(Policy::RoundRobin)
    );
    let m = &svc.http_routes[0].matches[0];
    assert_eq!(m.uri, Some(StringMatch { kind: Some(Kind::Prefix("/api".into())) }));
    assert_eq!(svc.http_routes[0].timeout_ms, 1500);

    let json = serde_json::to_string(&from_yaml).expect("serializes");
    assert!(json.contains(r#""policy":"ROUND_ROBIN""#), "enums by name: {json}");
    assert!(json.contains(r#""httpRoutes""#), "camelCase names: {json}");
    let from_json: ProxyConfig = serde_json::from_str(&json).expect("json parses");
    assert_eq!(from_json, from_yaml);

    let bytes = from_yaml.encode_to_vec();
    assert_eq!(ProxyConfig::decode(bytes.as_slice()).expect("decodes"), from_yaml);
}

#[test]
fn original_field_names_are_accepted_and_unknown_fields_rejected() {
    let snake: ProxyConfig =
        serde_json::from_str(r#"{"services":[{"name":"a","http_routes":[{"timeout_ms":5}]}]}"#)
            .expect("parses");
    assert_eq!(snake.services[0].http_routes[0].timeout_ms, 5);
    let err = serde_json::from_str::<ProxyConfig>(r#"{"servicez":[]}"#).expect_err("unknown field");
    assert!(err.to_string().contains("servicez"), "{err}");
}

#[test]
fn defaults_are_proto3_zero_values() {
    let lb: LoadBalancer = serde_json::from_str("{}").expect("parses");
    assert_eq!(lb.policy(), Policy::PeakEwma);
    assert!(!weft_proto::FILE_DESCRIPTOR_SET.is_empty());
}

#[test]
fn subscription_messages_round_trip_in_every_encoding() {
    use weft_proto::v1::{ConfigUpdate, InboundPolicy, MtlsMode, SubscribeRequest, authorization::Action};
    let yaml = r#"
version: "00ab"
config:
  version: "00ab"
  services: [{name: reviews.shop.svc.cluster.local, aliases: [reviews]}]
  inbound:
    workload: web-1.shop
    serviceAccount: web
    mtlsMode: MTLS_STRICT
    portMtls: {"8080": MTLS_DISABLE}
    authorizations:
      - name: shop/deny
        action: DENY
        rules: [{from: [{namespaces: [evil]}], to: [{ports: [8080], methods: [POST]}]}]
      - name: shop/allow-office
        action: ALLOW
        dryRun: true
        rules:
          - from: [{remoteIpBlocks: ["203.0.113.0/24"], notRemoteIpBlocks: ["203.0.113.7"]}]
            when:
              - {key: "request.headers[x-tenant]", values: [acme, "beta-*"], notValues: [beta-test]}
              - {key: destination.port, values: ["8080"]}
unresolved: [ratings]
"#;
    let update: ConfigUpdate = serde_yaml::from_str(yaml).expect("yaml parses");
    let inbound: &InboundPolicy = update.config.as_ref().unwrap().inbound.as_ref().unwrap();
    assert_eq!(inbound.mtls_mode(), MtlsMode::MtlsStrict);
    assert_eq!(inbound.port_mtls[&8080], MtlsMode::MtlsDisable as i32);
    assert_eq!(inbound.authorizations[0].rules[0].to[0].ports, [8080]);
    assert!(!inbound.authorizations[0].dry_run, "enforced unless said otherwise");
    let allow = &inbound.authorizations[1];
    assert_eq!((allow.action(), allow.dry_run), (Action::Allow, true));
    assert_eq!(allow.rules[0].from[0].remote_ip_blocks, ["203.0.113.0/24"]);
    assert_eq!(allow.rules[0].from[0].not_remote_ip_blocks, ["203.0.113.7"]);
    let when = &allow.rules[0].when;
    assert_eq!(when[0].key, "request.headers[x-tenant]");
    assert_eq!(when[0].values, ["acme", "beta-*"]);
    assert_eq!(when[0].not_values, ["beta-test"]);
    assert_eq!(
        (when[1].key.as_str(), when[1].values.as_slice()),
        ("destination.port", &["8080".to_owned()][..])
    );
    let json = serde_json::to_string(&update).expect("serializes");
    for name in [r#""dryRun":true"#, r#""remoteIpBlocks""#, r#""notRemoteIpBlocks""#, r#""notValues""#] {
        assert!(json.contains(name), "{name} in {json}");
    }
    assert_eq!(serde_json::from_str::<ConfigUpdate>(&json).expect("json parses"), update);
    assert_eq!(ConfigUpdate::decode(update.encode_to_vec().as_slice()).expect("decodes"), update);

    // The policy's old place (beside the config) is gone: a producer still writing it is refused,
    // not silently ignored.
    let stale = r#"{"version": "1", "inbound": {"workload": "web-1.shop"}}"#;
    let err =
        serde_json::from_str::<ConfigUpdate>(stale).expect_err("inbound is no longer a field of the update");
    assert!(err.to_string().contains("inbound"), "{err}");

    let request = SubscribeRequest {
        node: "web-1.shop".into(),
        subscribe: vec!["reviews".into()],
        ..Default::default()
    };
    assert_eq!(SubscribeRequest::decode(request.encode_to_vec().as_slice()).expect("decodes"), request);
}
