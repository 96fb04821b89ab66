//! Consistent hashing (DestinationRule `loadBalancer.consistentHash`): the key a request is
//! balanced by, from a header, a cookie, the client's address or a query parameter. A request
//! without the key is balanced by the cluster's policy, except with a cookie that has a `ttl`:
//! then the proxy makes one up and sets it on the response, so the client sticks from its next
//! request on.

use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
};

use http::{HeaderMap, HeaderValue, header::COOKIE};

use crate::{config::policy::HashOn, route::query_pairs};

/// A request's hash key, and the cookie to set when the proxy made the key up.
#[derive(Debug, PartialEq, Eq)]
pub struct Key {
    pub hash: u64,
    pub set_cookie: Option<HeaderValue>,
}

fn hash_of(value: impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The key for a request, if it has one (or gets one made up).
pub fn key(on: &HashOn, headers: &HeaderMap, query: Option<&str>, client: IpAddr) -> Option<Key> {
    let found = |hash| Some(Key { hash, set_cookie: None });
    match on {
        HashOn::Header(name) => headers.get(name).and_then(|v| found(hash_of(v.as_bytes()))),
        HashOn::SourceIp => found(hash_of(client)),
        HashOn::QueryParameter(name) => {
            query_pairs(query).find(|(k, _)| k == name).and_then(|(_, v)| found(hash_of(v.as_bytes())))
        }
        HashOn::Cookie { name, path, ttl } => match (cookie(headers, name), ttl) {
            (Some(v), _) => found(hash_of(v.as_bytes())),
            (None, Some(ttl)) => {
                let value = format!("{:016x}", fastrand::u64(..));
                let path = path.as_deref().map(|p| format!("; Path={p}")).unwrap_or_default();
                let header = format!("{name}={value}{path}; Max-Age={}; HttpOnly", ttl.as_secs().max(1));
                Some(Key { hash: hash_of(value.as_bytes()), set_cookie: HeaderValue::from_str(&header).ok() })
            }
            (None, None) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_come_from_where_the_policy_says() {
        let ip: IpAddr = [10, 0, 0, 1].into();
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("jason"));
        headers.insert(COOKIE, HeaderValue::from_static("a=1; session=abc"));
        let header = HashOn::Header("x-user".parse().unwrap());
        assert_eq!(key(&header, &headers, None, ip).unwrap().hash, hash_of(b"jason".as_slice()));
        assert!(key(&header, &HeaderMap::new(), None, ip).is_none(), "no header: no key");
        let cookie = HashOn::Cookie { name: "session".into(), path: None, ttl: None };
        assert_eq!(key(&cookie, &headers, None, ip).unwrap().hash, hash_of(b"abc".as_slice()));
        let q = HashOn::QueryParameter("u".into());
        assert_eq!(key(&q, &headers, Some("x=1&u=7"), ip).unwrap().hash, hash_of(b"7".as_slice()));
        assert_eq!(key(&HashOn::SourceIp, &headers, None, ip).unwrap().hash, hash_of(ip));
    }

    #[test]
    fn a_cookie_with_a_ttl_is_made_up_and_set() {
        let on =
            HashOn::Cookie { name: "s".into(), path: Some("/".into()), ttl: Some(Duration::from_secs(60)) };
        let k = key(&on, &HeaderMap::new(), None, [10, 0, 0, 1].into()).unwrap();
        let set = k.set_cookie.unwrap();
        let set = set.to_str().unwrap();
        assert!(set.starts_with("s=") && set.ends_with("; Path=/; Max-Age=60; HttpOnly"), "{set}");
        let value = &set[2..18];
        assert_eq!(k.hash, hash_of(value.as_bytes()), "the key is the cookie's value, as next time");
    }
}
