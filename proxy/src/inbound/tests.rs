//! Table tests of the decision: each case is a policy (the operator's YAML form), a request or
//! connection, and the expected outcome.

use std::net::SocketAddr;

use http::{HeaderMap, Method};

use super::*;

fn inbound(yaml: &str) -> Inbound {
    let policy: pb::InboundPolicy = serde_yaml::from_str(yaml).expect("policy parses");
    compile(&policy).expect("policy compiles")
}

/// A request (or, with `method` empty, an opaque TCP connection) to 10.1.0.5:8080.
struct Req {
    principal: Option<&'static str>,
    source: &'static str,
    port: u16,
    host: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

const WEB: &str = "cluster.local/ns/shop/sa/web";

fn get(path: &'static str) -> Req {
    Req {
        principal: Some(WEB),
        source: "10.1.0.9",
        port: 8080,
        host: "orders.shop",
        method: "GET",
        path,
        headers: vec![],
    }
}

fn tcp() -> Req {
    Req { method: "", ..get("") }
}

/// `f` of what `r` carries.
fn with_facts<T>(r: &Req, f: impl FnOnce(&Facts<'_>) -> T) -> T {
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        headers.append(HeaderName::from_static(k), v.parse().unwrap());
    }
    let method = (!r.method.is_empty()).then(|| Method::from_bytes(r.method.as_bytes()).unwrap());
    let facts = Facts {
        principal: r.principal,
        namespace: r.principal.and_then(|p| p.split('/').nth(2)),
        source: r.source.parse().unwrap(),
        destination: SocketAddr::new("10.1.0.5".parse().unwrap(), r.port),
        sni: None,
        http: method.as_ref().map(|m| HttpFacts::new((r.host, Some(r.port)), m, r.path, &headers)),
    };
    f(&facts)
}

fn decide<'p>(policy: &'p Inbound, r: &Req) -> Decision<'p> {
    with_facts(r, |facts| policy.decide(facts))
}

/// The enforced verdict without indexes nor gates: every rule of every policy checked in full.
fn reference<'p>(policy: &'p Inbound, facts: &Facts<'_>) -> Option<Verdict<'p>> {
    let set = &policy.enforced;
    if set.is_empty() {
        return None;
    }
    let matches = |p: &Policy, deny: bool| {
        p.rules.all.iter().any(|r| match r.check(facts) {
            Check::Yes => true,
            Check::No => false,
            Check::Unknown => deny,
        })
    };
    let verdict = |allowed, p: Option<&'p Policy>| Verdict { allowed, policy: p.map(|p| &*p.name) };
    if let Some(p) = set.deny.all.iter().find(|p| matches(p, true)) {
        return Some(verdict(false, Some(p)));
    }
    if set.allow.is_empty() {
        return Some(verdict(true, None));
    }
    Some(match set.allow.all.iter().find(|p| matches(p, false)) {
        Some(p) => verdict(true, Some(p)),
        None => verdict(false, None),
    })
}

fn allowed(policy: &Inbound, r: &Req) -> bool {
    decide(policy, r).allowed()
}

#[test]
fn no_policy_allows_and_counts_nothing() {
    let p = inbound("workload: orders-1.shop");
    assert!(!p.authorizes());
    assert_eq!(decide(&p, &get("/")), Decision::default());
    assert!(allowed(&p, &tcp()));
}

#[test]
fn deny_is_checked_first_then_any_allow_must_match() {
    let p = inbound(
        r#"
authorizations:
  - {name: shop/allow-web, action: ALLOW, rules: [{from: [{principals: ["cluster.local/ns/shop/sa/*"]}]}]}
  - {name: shop/deny-admin, action: DENY, rules: [{to: [{paths: ["/admin*"]}]}]}
"#,
    );
    let by = |d: Decision| d.enforced.map(|v| (v.allowed, v.policy.map(str::to_owned)));
    assert_eq!(by(decide(&p, &get("/orders"))), Some((true, Some("shop/allow-web".into()))));
    assert_eq!(by(decide(&p, &get("/admin/users"))), Some((false, Some("shop/deny-admin".into()))));
    let stranger = Req { principal: Some("cluster.local/ns/other/sa/x"), ..get("/orders") };
    assert_eq!(by(decide(&p, &stranger)), Some((false, None)), "no ALLOW matched");
    let plain = Req { principal: None, ..get("/orders") };
    assert!(!allowed(&p, &plain), "a principal needs mTLS");
}

#[test]
fn allow_policy_without_rules_denies_everything_and_an_empty_rule_allows_everything() {
    assert!(!allowed(&inbound("authorizations: [{name: a/none, action: ALLOW}]"), &get("/")));
    assert!(allowed(&inbound("authorizations: [{name: a/all, action: ALLOW, rules: [{}]}]"), &get("/")));
    let only_deny =
        inbound("authorizations: [{name: a/d, action: DENY, rules: [{to: [{methods: [POST]}]}]}]");
    assert!(allowed(&only_deny, &get("/")), "DENY alone allows what it does not match");
}

#[test]
fn every_source_and_operation_field_and_its_negation() {
    // (rule, request, expected allowed) under one ALLOW policy holding the rule.
    let cases: &[(&str, Req, bool)] = &[
        ("{from: [{}], to: [{ports: [8080]}]}", get("/"), true),
        ("{to: [{ports: [9090]}]}", get("/"), false),
        ("{to: [{notPorts: [8080]}]}", get("/"), false),
        ("{to: [{methods: [GET, HEAD]}]}", get("/"), true),
        ("{to: [{notMethods: [GET]}]}", get("/"), false),
        ("{to: [{hosts: [\"*.shop\"]}]}", get("/"), true),
        ("{to: [{hosts: [\"ORDERS.SHOP\"]}]}", get("/"), true),
        ("{to: [{notHosts: [\"orders.*\"]}]}", get("/"), false),
        ("{to: [{hosts: [\"orders.shop:8080\"]}]}", get("/"), true),
        ("{to: [{hosts: [\"orders.shop:9090\"]}]}", get("/"), false),
        ("{when: [{key: \"request.headers[host]\", values: [\"orders.*\"]}]}", get("/"), true),
        (
            "{when: [{key: \"request.headers[cookie]\", values: [\"a=1; b=2\"]}]}",
            Req { headers: vec![("cookie", "a=1"), ("cookie", "b=2")], ..get("/") },
            true,
        ),
        (
            "{when: [{key: \"request.headers[x-user]\", values: [alice]}]}",
            Req { headers: vec![("x-user", "alice"), ("connection", "x-user")], ..get("/") },
            false,
        ),
        ("{to: [{paths: [\"*.css\"]}]}", get("/a.css"), true),
        ("{to: [{notPaths: [\"/a.css\"]}]}", get("/a.css"), false),
        ("{from: [{namespaces: [shop]}]}", get("/"), true),
        ("{from: [{notNamespaces: [shop]}]}", get("/"), false),
        ("{from: [{principals: [\"*\"]}]}", Req { principal: None, ..get("/") }, false),
        ("{from: [{notPrincipals: [\"*\"]}]}", Req { principal: None, ..get("/") }, true),
        ("{from: [{ipBlocks: [10.1.0.0/16]}]}", get("/"), true),
        ("{from: [{notIpBlocks: [10.1.0.9]}]}", get("/"), false),
        ("{from: [{remoteIpBlocks: [192.168.0.0/16]}]}", get("/"), false),
        ("{from: [{notRemoteIpBlocks: [0.0.0.0/0]}]}", get("/"), false),
        ("{when: [{key: source.ip, values: [10.1.0.0/24]}]}", get("/"), true),
        ("{when: [{key: source.namespace, notValues: [shop]}]}", get("/"), false),
        ("{when: [{key: source.principal, values: [\"*/sa/web\"]}]}", get("/"), true),
        ("{when: [{key: destination.ip, values: [10.1.0.5]}]}", get("/"), true),
        ("{when: [{key: destination.port, values: [\"8080\"]}]}", get("/"), true),
        ("{when: [{key: connection.sni, values: [\"*\"]}]}", get("/"), false),
        (
            "{when: [{key: \"request.headers[x-user]\", values: [alice]}]}",
            Req { headers: vec![("x-user", "alice")], ..get("/") },
            true,
        ),
        ("{when: [{key: \"request.headers[x-user]\", values: [alice]}]}", get("/"), false),
        ("{when: [{key: \"request.headers[x-user]\", notValues: [bob]}]}", get("/"), true),
        // Two `from` entries: either one; two fields in one entry: both.
        ("{from: [{namespaces: [x]}, {namespaces: [shop]}]}", get("/"), true),
        ("{from: [{namespaces: [shop], ipBlocks: [192.0.2.0/24]}]}", get("/"), false),
    ];
    for (rule, req, expected) in cases {
        let p = inbound(&format!("authorizations: [{{name: t/p, action: ALLOW, rules: [{rule}]}}]"));
        assert_eq!(allowed(&p, req), *expected, "ALLOW rule {rule} on {} {}", req.method, req.path);
    }
}

#[test]
fn http_fields_on_tcp_never_allow_more_nor_deny_less() {
    let allow_get =
        inbound("authorizations: [{name: t/a, action: ALLOW, rules: [{to: [{methods: [GET]}]}]}]");
    assert!(allowed(&allow_get, &get("/")));
    assert!(!allowed(&allow_get, &tcp()), "an ALLOW rule that needs a method does not match TCP");
    let deny_post = inbound(
        "authorizations: [{name: t/d, action: DENY, rules: [{to: [{methods: [POST], ports: [8080]}]}]}]",
    );
    assert!(allowed(&deny_post, &get("/")));
    assert!(!allowed(&deny_post, &tcp()), "a DENY rule drops its HTTP fields on TCP and matches more");
    let deny_other_port = inbound(
        "authorizations: [{name: t/d, action: DENY, rules: [{to: [{methods: [POST], ports: [9090]}]}]}]",
    );
    assert!(allowed(&deny_other_port, &tcp()), "the TCP fields still apply");
    let deny_header = inbound(
        "authorizations: [{name: t/d, action: DENY, rules: [{when: [{key: \"request.headers[x-a]\", values: [b]}]}]}]",
    );
    assert!(!allowed(&deny_header, &tcp()));
}

#[test]
fn a_header_sent_twice_is_never_read_in_the_clients_favour() {
    let twice = Req { headers: vec![("x-user", "guest"), ("x-user", "admin")], ..get("/") };
    let deny_admin = inbound(
        "authorizations: [{name: t/d, action: DENY, rules: [{when: [{key: \"request.headers[x-user]\", values: [admin]}]}]}]",
    );
    assert!(!allowed(&deny_admin, &twice), "a DENY condition holds when a duplicate might satisfy it");
    let allow_guest = inbound(
        "authorizations: [{name: t/a, action: ALLOW, rules: [{when: [{key: \"request.headers[x-user]\", values: [guest]}]}]}]",
    );
    assert!(!allowed(&allow_guest, &twice), "an ALLOW condition does not");
    assert!(allowed(&allow_guest, &Req { headers: vec![("x-user", "guest")], ..get("/") }));
}

#[test]
fn paths_and_methods_are_case_sensitive_hosts_are_not() {
    let deny_admin =
        inbound("authorizations: [{name: t/d, action: DENY, rules: [{to: [{paths: [\"/admin\"]}]}]}]");
    assert!(!allowed(&deny_admin, &get("/admin")));
    assert!(allowed(&deny_admin, &get("/ADMIN")), "Istio matches paths case-sensitively");
    let allow_get =
        inbound("authorizations: [{name: t/a, action: ALLOW, rules: [{to: [{methods: [GET]}]}]}]");
    assert!(!allowed(&allow_get, &Req { method: "get", ..get("/") }));
}

#[test]
fn the_fast_gates_never_change_a_decision() {
    // (rule, method, path, expected allowed under one ALLOW policy holding the rule)
    let cases = [
        ("{to: [{methods: [\"G*\"]}]}", "GET", "/", true),
        ("{to: [{methods: [GET]}, {paths: [\"/x\"]}]}", "POST", "/x", true),
        ("{to: [{methods: [GET]}, {paths: [\"/x\"]}]}", "POST", "/y", false),
        ("{to: [{methods: [PURGE]}]}", "PURGE", "/", true),
        ("{to: [{methods: [GET, DELETE]}]}", "DELETE", "/", true),
        ("{to: [{methods: [GET, DELETE]}]}", "PUT", "/", false),
        ("{from: [{principals: [\"*\"]}, {ipBlocks: [10.1.0.9]}]}", "GET", "/", true),
    ];
    for (rule, method, path, expected) in cases {
        let p = inbound(&format!("authorizations: [{{name: t/p, action: ALLOW, rules: [{rule}]}}]"));
        let req = Req { principal: None, method, path, ..get("/") };
        assert_eq!(allowed(&p, &req), expected, "{rule} on plain text {method} {path}");
    }
}

#[test]
fn the_indexes_never_change_a_decision() {
    // Rules the gates can and cannot rule out, for every kind of request: with and without an
    // identity, opaque TCP, standard methods (exact, by pattern, negated) and others.
    let rules = [
        "{from: [{principals: [\"cluster.local/ns/shop/sa/web\"]}], to: [{methods: [DELETE]}]}",
        "{from: [{principals: [\"cluster.local/ns/shop/sa/other\"]}], to: [{methods: [GET, POST]}]}",
        "{from: [{namespaces: [shop]}, {ipBlocks: [10.1.0.0/16]}]}",
        "{from: [{notPrincipals: [\"*/sa/web\"]}], to: [{methods: [PURGE]}]}",
        "{to: [{methods: [\"G*\"]}, {paths: [\"/x\"]}]}",
        "{to: [{methods: [GET]}, {methods: [PATCH], paths: [\"/x\"]}]}",
        "{to: [{notMethods: [GET], ports: [8080]}]}",
        "{to: [{ports: [8080]}]}",
        "{to: [{paths: [\"/x\"]}]}",
        "{from: [{principals: [\"*\"]}], when: [{key: \"request.headers[x-a]\", values: [b]}]}",
        "{}",
    ];
    let mut requests = vec![tcp(), Req { principal: None, ..tcp() }];
    for method in
        ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PURGE", "get"]
    {
        for principal in [Some(WEB), Some("cluster.local/ns/shop/sa/other"), None] {
            for path in ["/", "/x"] {
                requests.push(Req { principal, method, path, ..get(path) });
            }
        }
    }
    for (i, a) in rules.iter().enumerate() {
        for b in &rules[i..] {
            for (first, second) in [("DENY", "ALLOW"), ("ALLOW", "ALLOW"), ("DENY", "DENY")] {
                let p = inbound(&format!(
                    "authorizations: [{{name: t/a, action: {first}, rules: [{a}]}}, {{name: t/b, action: {second}, rules: [{b}, {a}]}}]"
                ));
                for r in &requests {
                    let indexed = decide(&p, r).enforced;
                    let full = with_facts(r, |facts| reference(&p, facts));
                    assert_eq!(
                        indexed, full,
                        "{first} {a}, {second} {b}: {:?} {} {}",
                        r.principal, r.method, r.path
                    );
                }
            }
        }
    }
}

#[test]
fn path_parameters_never_read_in_the_clients_favour() {
    let deny_admin =
        inbound("authorizations: [{name: t/d, action: DENY, rules: [{to: [{paths: [\"/admin\"]}]}]}]");
    assert!(!allowed(&deny_admin, &get("/admin;x")), "an app may read /admin;x as /admin");
    assert!(allowed(&deny_admin, &get("/public;jsessionid=1")));
    let allow_admin =
        inbound("authorizations: [{name: t/a, action: ALLOW, rules: [{to: [{paths: [\"/admin\"]}]}]}]");
    assert!(!allowed(&allow_admin, &get("/admin;x")), "nor does an ALLOW rule read it as /admin");
    let allow_api =
        inbound("authorizations: [{name: t/a, action: ALLOW, rules: [{to: [{paths: [\"/api/*\"]}]}]}]");
    assert!(allowed(&allow_api, &get("/api/v1;a=b/items")), "both readings agree");
}

#[test]
fn dry_run_policies_are_decided_on_their_own_and_never_enforced() {
    let p = inbound(
        r#"
authorizations:
  - {name: t/would-deny, action: DENY, dryRun: true, rules: [{to: [{paths: ["/admin"]}]}]}
"#,
    );
    assert!(p.authorizes());
    let d = decide(&p, &get("/admin"));
    assert!(d.allowed());
    assert_eq!(d.enforced, None);
    assert_eq!(d.dry_run, Some(Verdict { allowed: false, policy: Some("t/would-deny") }));
}

#[test]
fn mtls_mode_per_port_overrides_the_workload_mode() {
    let p = inbound("mtlsMode: MTLS_STRICT\nportMtls: {\"9090\": MTLS_PERMISSIVE, \"9091\": MTLS_DISABLE}");
    assert_eq!(p.mtls(8080), MtlsMode::Strict);
    assert_eq!(p.mtls(9090), MtlsMode::Permissive);
    assert_eq!(p.mtls(9091), MtlsMode::Disable);
    assert_eq!(inbound("workload: w.ns").mtls(80), MtlsMode::Permissive, "the default");
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    let bad = |yaml: &str| {
        let policy: pb::InboundPolicy = serde_yaml::from_str(yaml).unwrap();
        compile(&policy).unwrap_err().to_string()
    };
    let e = bad("authorizations: [{name: a, rules: [{from: [{ipBlocks: [10.0.0.0/33]}]}]}]");
    assert!(e.starts_with("inbound.authorizations[0].rules[0].from[0].ipBlocks"), "{e}");
    let e = bad(
        "authorizations: [{name: a, rules: [{when: [{key: \"request.auth.claims[iss]\", values: [x]}]}]}]",
    );
    assert!(e.contains("when[0].key") && e.contains("request.auth.claims[iss]"), "{e}");
    let e = bad("authorizations: [{name: a, rules: [{when: [{key: destination.port, values: [http]}]}]}]");
    assert!(e.contains("when[0].values"), "{e}");
    let e = bad("authorizations: [{name: a, rules: [{to: [{paths: [\"/a/{*}/b\"]}]}]}]");
    assert!(e.contains("path templates"), "{e}");
    let e = bad("authorizations: [{name: a, rules: [{to: [{ports: [70000]}]}]}]");
    assert!(e.contains("to[0].ports"), "{e}");
}

#[test]
fn ip_blocks_cover_v4_v6_and_mapped_addresses() {
    let b = IpBlock::parse("10.1.0.0/16").unwrap();
    assert!(b.contains("10.1.255.1".parse().unwrap()));
    assert!(!b.contains("10.2.0.1".parse().unwrap()));
    assert!(b.contains("::ffff:10.1.0.1".parse().unwrap()));
    assert!(IpBlock::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
    assert!(IpBlock::parse("2001:db8::/32").unwrap().contains("2001:db8::1".parse().unwrap()));
    assert!(!IpBlock::parse("2001:db8::/32").unwrap().contains("10.0.0.1".parse().unwrap()));
    for bad in ["10.0.0.0/33", "10.0.0", "x", "::/129", "10.0.0.0/"] {
        assert_eq!(IpBlock::parse(bad), None, "{bad}");
    }
}
