//! SPIFFE IDs of mesh workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

/// A workload identity. Only the Kubernetes form is accepted: one namespace, one service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "{0:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Form(String),
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("invalid namespace {0:?}: a DNS label (lowercase letters, digits, '-'; at most 63)")]
    Namespace(String),
    #[error(
        "invalid service account {0:?}: a DNS subdomain (lowercase letters, digits, '-', '.'; at most 253)"
    )]
    ServiceAccount(String),
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, Error> {
        let valid = |s: &str, max: usize, extra: &[char]| {
            !s.is_empty()
                && s.len() <= max
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(&c))
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        if !valid(trust_domain, 255, &['.', '-', '_']) {
            return Err(Error::TrustDomain(trust_domain.to_owned()));
        }
        if !valid(namespace, 63, &['-']) {
            return Err(Error::Namespace(namespace.to_owned()));
        }
        if !valid(service_account, 253, &['-', '.']) {
            return Err(Error::ServiceAccount(service_account.to_owned()));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The DNS form a client puts in TLS SNI to say which identity it expects:
    /// `<service-account>.<namespace>.sa.<trust-domain>`. Namespaces hold no dots and the suffix
    /// is fixed per mesh, so two different IDs of one trust domain never share this name.
    pub fn server_name(&self) -> String {
        format!("{}.{}.sa.{}", self.service_account, self.namespace, self.trust_domain)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<SpiffeId, Error> {
        let form = || Error::Form(s.to_owned());
        let rest = s.strip_prefix(SCHEME).ok_or_else(form)?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => SpiffeId::new(td, ns, sa),
            _ => Err(form()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_kubernetes_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/prod/sa/reviews".parse().unwrap();
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "prod", "reviews")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/prod/sa/reviews");
        assert_eq!(id.server_name(), "reviews.prod.sa.cluster.local");
    }

    #[test]
    fn rejects_other_forms_naming_the_part() {
        for bad in [
            "",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
        ] {
            assert_eq!(bad.parse::<SpiffeId>(), Err(Error::Form(bad.into())), "{bad:?}");
        }
        assert!(matches!("spiffe://Cluster/ns/a/sa/b".parse::<SpiffeId>(), Err(Error::TrustDomain(_))));
        assert!(matches!("spiffe://td/ns/a.b/sa/b".parse::<SpiffeId>(), Err(Error::Namespace(_))));
        assert!(matches!("spiffe://td/ns//sa/b".parse::<SpiffeId>(), Err(Error::Namespace(_))));
        assert!(matches!("spiffe://td/ns/a/sa/B".parse::<SpiffeId>(), Err(Error::ServiceAccount(_))));
        assert!(matches!("spiffe://td/ns/a/sa/-b".parse::<SpiffeId>(), Err(Error::ServiceAccount(_))));
    }

    #[test]
    fn server_names_of_different_ids_differ() {
        // A dotted service account against a namespace that would absorb the dot.
        let a = SpiffeId::new("td", "c", "a.b").unwrap();
        let b = SpiffeId::new("td", "b", "a").unwrap();
        assert_ne!(a.server_name(), b.server_name());
    }
}

/// Property tests: the parser takes outside input (certificates' URI SANs, config files), so any
/// string gives an ID or a typed error, never a panic, and valid IDs round-trip.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    const TRUST_DOMAIN: &str = "[a-z0-9]([a-z0-9._-]{0,40}[a-z0-9])?";
    const NAMESPACE: &str = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";
    const SERVICE_ACCOUNT: &str = "[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?";
    /// A path segment with the characters that matter to the parser, valid or not.
    const SEGMENT: &str = "[a-zA-Z0-9._/: -]{0,12}";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_string_parses_or_names_the_problem(s in any::<String>()) {
            let _ = check(&s)?;
            let _ = check(&format!("{SCHEME}{s}"))?;
        }

        #[test]
        fn the_kubernetes_form_with_any_segments_is_checked_part_by_part(
            td in SEGMENT, ns in SEGMENT, sa in SEGMENT,
        ) {
            let s = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
            let parsed = check(&s)?;
            if ![&td, &ns, &sa].iter().any(|p| p.contains('/')) {
                prop_assert_eq!(parsed, SpiffeId::new(&td, &ns, &sa));
            }
        }

        #[test]
        fn ids_from_valid_parts_round_trip(
            td in TRUST_DOMAIN, ns in NAMESPACE, sa in SERVICE_ACCOUNT,
        ) {
            let id = SpiffeId::new(&td, &ns, &sa).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(
                (id.trust_domain(), id.namespace(), id.service_account()),
                (td.as_str(), ns.as_str(), sa.as_str())
            );
            let text = id.to_string();
            prop_assert_eq!(&text, &format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
            prop_assert_eq!(text.parse::<SpiffeId>(), Ok(id.clone()));
            prop_assert_eq!(id.server_name(), format!("{sa}.{ns}.sa.{td}"));
        }
    }

    /// Parses `s`: an error names its input or a part of it; an ID prints back as `s`.
    fn check(s: &str) -> Result<Result<SpiffeId, Error>, TestCaseError> {
        let parsed = s.parse::<SpiffeId>();
        match &parsed {
            Ok(id) => prop_assert_eq!(id.to_string(), s),
            Err(Error::Form(input)) => prop_assert_eq!(input, s),
            Err(Error::TrustDomain(part) | Error::Namespace(part) | Error::ServiceAccount(part)) => {
                prop_assert!(s.contains(part.as_str()), "{part:?} is not part of {s:?}");
                prop_assert!(!parsed.as_ref().unwrap_err().to_string().is_empty());
            }
        }
        Ok(parsed)
    }
}
