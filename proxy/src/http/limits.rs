//! Request limits hyper does not apply the way the proxy wants.
//!
//! - The request target: `--max-uri-bytes` (414). hyper answers 431 for a head longer than
//!   `--max-header-bytes` even when the request line alone is what made it long, and checks no
//!   target length of its own below 64 KiB. So HTTP/1.1 request lines are measured as they are
//!   read (`RequestLine`, driven by `io::ActivityIo`), and one still unfinished past the limit is
//!   answered 414 right there; `LimitsLayer` checks the parsed target of both versions (HTTP/2's
//!   `:path`).
//! - The number of header fields: `--max-headers` (431). hyper stops HTTP/1.1 heads at it, but
//!   HTTP/2 has only the header list's size (`SETTINGS_MAX_HEADER_LIST_SIZE`): `LimitsLayer`
//!   counts HTTP/2 fields before routing.
//!
//! An HTTP/2 `:path` longer than the whole header list may be never becomes a request: h2 answers
//! 431 itself.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    task::{Context, Poll},
};

use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use tokio_util::either::Either;
use tower::{Layer, Service};

use super::{
    Body,
    error::{Failure, is_grpc, respond},
    headers::REQUEST_ID,
    observe::ResponseInfo,
};

/// What the proxy writes itself for a request line past the limit (no request exists yet to go
/// through `error::respond`); the connection then closes.
pub const URI_TOO_LONG_ANSWER: &[u8] = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain\r\n\
x-weft-error: uri too long\r\nconnection: close\r\ncontent-length: 13\r\n\r\nuri too long\n";

/// Room for the method, spaces and version around a target in a request line.
const REQUEST_LINE_SLACK: usize = 64;

/// The length of a request target as the client sent it (origin or absolute form).
fn target_len(uri: &Uri) -> usize {
    let pq = uri.path_and_query().map_or(0, |p| p.as_str().len());
    match (uri.scheme(), uri.authority()) {
        (Some(scheme), Some(authority)) => scheme.as_str().len() + 3 + authority.as_str().len() + pq,
        (_, Some(authority)) => authority.as_str().len() + pq,
        _ => pq,
    }
}

/// The failure a request head earns under these limits, if any.
pub fn check<B>(req: &Request<B>, max_uri_bytes: usize, max_headers: usize) -> Option<Failure> {
    if req.version() == Version::HTTP_2 {
        // HTTP/2 requests carry the authority apart from `:path`.
        let path = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if path > max_uri_bytes {
            return Some(Failure::UriTooLong);
        }
        // Not counting the `x-request-id` the proxy adds when there is none.
        let fields = req.headers().len();
        if fields > max_headers && fields - usize::from(req.headers().contains_key(&REQUEST_ID)) > max_headers
        {
            return Some(Failure::TooManyHeaders);
        }
        return None;
    }
    (target_len(req.uri()) > max_uri_bytes).then_some(Failure::UriTooLong)
}

/// Refuses requests over the limits (`check`) before they are routed.
#[derive(Clone, Copy, Debug)]
pub struct LimitsLayer {
    pub max_uri_bytes: usize,
    pub max_headers: usize,
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;
    fn layer(&self, inner: S) -> Limits<S> {
        Limits { inner, limits: *self }
    }
}

#[derive(Clone, Debug)]
pub struct Limits<S> {
    inner: S,
    limits: LimitsLayer,
}

impl<S> Service<Request<Incoming>> for Limits<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let LimitsLayer { max_uri_bytes, max_headers } = self.limits;
        match check(&req, max_uri_bytes, max_headers) {
            None => Either::Right(self.inner.call(req)),
            Some(failure) => {
                tracing::debug!(
                    reason = failure.reason(),
                    target_bytes = target_len(req.uri()),
                    headers = req.headers().len(),
                    "refusing a request over the limits"
                );
                Either::Left(ready(Ok(respond(failure, is_grpc(&req), ResponseInfo::default()))))
            }
        }
    }
}

/// HTTP/1.1: the request line of the head being read, measured as its bytes arrive.
///
/// The proxy knows a head starts from `io::Activity` (the first bytes read with no request in
/// flight), which also holds for a request body hyper drains after an early response. So bytes
/// that cannot be a request line (a control or non-ASCII byte, or no space after a method's
/// length) end the measuring, and hyper judges them as it would.
#[derive(Debug)]
pub struct RequestLine {
    /// A request line still unfinished at this length is refused.
    max: usize,
    /// A request line this long is refused even if it ends: the head cannot fit.
    head: usize,
    state: LineState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineState {
    /// Not in a request line (in the rest of a head, a body, or between requests).
    Idle,
    /// A head started; empty lines before its request line are allowed (RFC 9112 section 2.2).
    Leading,
    /// `read` bytes of the request line so far; `spaced`: the method has ended.
    Line { read: usize, spaced: bool },
}

/// Longer methods than this are not measured (the standard ones have at most 7 letters).
const MAX_METHOD: usize = 32;

impl RequestLine {
    /// A line is refused once it is longer than a target of `max_uri_bytes` could make it, or
    /// than the whole head may be.
    pub fn new(max_uri_bytes: usize, max_head_bytes: usize) -> RequestLine {
        let head = max_head_bytes.max(1);
        let max = max_uri_bytes.saturating_add(REQUEST_LINE_SLACK).min(head);
        RequestLine { max, head, state: LineState::Idle }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// The next bytes read start a request head.
    pub fn head_started(&mut self) {
        self.state = LineState::Leading;
    }

    /// Measures `bytes`, just read; true when the request line has run past the limit. A line
    /// that ends within the same read is left to hyper and `check` (counted like any request),
    /// unless it is as long as the whole head may be.
    pub fn too_long(&mut self, mut bytes: &[u8]) -> bool {
        if self.state == LineState::Leading {
            let Some(start) = bytes.iter().position(|&b| b != b'\r' && b != b'\n') else { return false };
            bytes = &bytes[start..];
            self.state = LineState::Line { read: 0, spaced: false };
        }
        let LineState::Line { mut read, mut spaced } = self.state else { return false };
        // The common case: a short line, whole in one read, checked no further here.
        let end = bytes.iter().position(|&b| b == b'\n');
        if let Some(end) = end
            && read.saturating_add(end) < self.head
        {
            self.state = LineState::Idle;
            return false;
        }
        // A line spanning reads (long, or a slow client), or as long as the head may be: make
        // sure these bytes are a request line.
        for &b in &bytes[..end.unwrap_or(bytes.len())] {
            let printable = (b' '..=b'~').contains(&b) || b == b'\r';
            if !printable || (!spaced && read >= MAX_METHOD) {
                self.state = LineState::Idle;
                return false;
            }
            spaced |= b == b' ';
            read += 1;
        }
        if end.is_some() {
            self.state = LineState::Idle;
            return true;
        }
        self.state = LineState::Line { read, spaced };
        read >= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::URI_TOO_LONG;

    #[test]
    fn request_lines_are_measured_across_reads_until_they_end() {
        let mut line = RequestLine::new(100, 64 * 1024);
        assert_eq!(line.max(), 164);
        assert!(!line.too_long(&[b'a'; 500]), "not in a head: nothing measured");
        line.head_started();
        assert!(!line.too_long(b"\r\n\r\nGET /"), "leading empty lines are skipped");
        assert!(!line.too_long(&[b'a'; 158]));
        assert!(line.too_long(b"a"), "164 bytes and no end");

        line.head_started();
        assert!(!line.too_long(b"GET /short HTTP/1.1\r\nhost: x\r\n"));
        assert!(!line.too_long(&[b'a'; 1000]), "a long header line is hyper's to limit");

        line.head_started();
        let whole = [b"GET /".as_slice(), &[b'a'; 300], b" HTTP/1.1\r\n"].concat();
        assert!(!line.too_long(&whole), "a line that ends in the same read is parsed and checked");

        // The head limit caps it: a line as long as the whole head may be is refused.
        let mut line = RequestLine::new(64 * 1024, 8192);
        line.head_started();
        assert!(!line.too_long(b"POST /"));
        assert!(!line.too_long(&[b'a'; 8185]));
        assert!(line.too_long(b"a"));
    }

    #[test]
    fn bytes_that_cannot_be_a_request_line_are_not_measured() {
        // A body hyper drains after an early response looks like the start of a head.
        let mut line = RequestLine::new(100, 64 * 1024);
        for body in [vec![b'{'; 1000], [b"GET /".as_slice(), &[0u8; 10], &[b'a'; 1000]].concat()] {
            line.head_started();
            assert!(!line.too_long(&body), "no space after a method's length, or a control byte");
            assert!(!line.too_long(&[b'a'; 1000]), "and no more measuring until the next head");
        }
    }

    #[test]
    fn parsed_targets_and_http2_header_counts_are_checked() {
        let req = |version, uri: &str, headers: usize| {
            let mut req = Request::get(uri).version(version).body(()).unwrap();
            for i in 0..headers {
                let name = http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
                req.headers_mut().insert(name, http::HeaderValue::from_static("v"));
            }
            req
        };
        let long = format!("/{}", "a".repeat(20));
        assert_eq!(check(&req(Version::HTTP_11, &long, 0), 20, 100), Some(Failure::UriTooLong));
        assert_eq!(check(&req(Version::HTTP_11, &long, 0), 21, 100), None);
        assert_eq!(check(&req(Version::HTTP_11, "http://h/abc", 0), 11, 100), Some(Failure::UriTooLong));
        assert_eq!(check(&req(Version::HTTP_11, "http://h/abc", 0), 12, 100), None);
        assert_eq!(check(&req(Version::HTTP_2, &format!("http://host{long}"), 0), 21, 100), None);
        assert_eq!(check(&req(Version::HTTP_2, &long, 0), 20, 100), Some(Failure::UriTooLong));
        assert_eq!(check(&req(Version::HTTP_2, "/", 100), 20, 100), None);
        assert_eq!(check(&req(Version::HTTP_2, "/", 101), 20, 100), Some(Failure::TooManyHeaders));
        let mut with_id = req(Version::HTTP_2, "/", 100);
        with_id.headers_mut().insert(REQUEST_ID.clone(), http::HeaderValue::from_static("id"));
        assert_eq!(check(&with_id, 20, 100), None, "x-request-id is not counted");
        assert_eq!(check(&req(Version::HTTP_11, "/", 101), 20, 100), None, "hyper counts HTTP/1.1");
    }

    #[test]
    fn the_written_answer_matches_the_reason() {
        let answer = std::str::from_utf8(URI_TOO_LONG_ANSWER).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("x-weft-error: {URI_TOO_LONG}")));
        assert_eq!(body, format!("{URI_TOO_LONG}\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
