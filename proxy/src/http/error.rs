//! Why the proxy answered a request itself, and the one place that turns it into a response: the
//! status, an `x-weft-error` reason, Envoy's response flags (for the access log and the bounded
//! `response_flags` metric label), and for gRPC requests a trailers-only gRPC status instead of a
//! text body.

use http::{HeaderValue, Response, StatusCode, header::CONTENT_TYPE};

use super::{Body, empty, flags::Flags, full, observe::ResponseInfo};

/// Why the proxy answers a request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    NoConfig,
    NoRoute,
    NoHealthyUpstream,
    /// A connection-pool limit was reached.
    Overflow,
    ConnectFailed,
    Timeout,
    /// The upstream connection broke before an answer.
    UpstreamReset,
    /// An injected abort with an HTTP status.
    AbortHttp(StatusCode),
    /// An injected abort with a gRPC status.
    AbortGrpc(u32),
    AmbiguousFraming,
    BadRedirect,
    BadRequestTarget,
    /// The `Host` header is missing, repeated or malformed (`headers::bad_host`).
    BadHost,
    /// The path cannot be normalized without ambiguity (`http::normalize`).
    BadPath(super::normalize::Refused),
    /// An authorization policy denied the request.
    Denied,
    /// Plain text on a connection accepted before the workload's mode became STRICT.
    MtlsRequired,
    /// The request target (or `:path`) is longer than `--max-uri-bytes`.
    UriTooLong,
    /// More header fields than `--max-headers` (HTTP/2; hyper refuses HTTP/1.1 heads itself).
    TooManyHeaders,
    /// The client's request body broke its framing (bad chunk size line, chunk data longer than
    /// its size, an HTTP/2 protocol error on the stream).
    BadRequestBody,
    /// The client went away (closed, reset the stream) before its request body was complete.
    ClientAborted,
    /// The request body stopped arriving for `--request-body-timeout`.
    RequestBodyTimeout,
}

/// nginx's "client closed request": a status for the logs and metrics only, as nobody is left
/// to receive it.
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Failure {
    pub fn flags(self) -> Flags {
        match self {
            Failure::NoConfig => Flags::NC,
            Failure::NoRoute => Flags::NR,
            Failure::NoHealthyUpstream => Flags::UH,
            Failure::Overflow => Flags::UO,
            Failure::ConnectFailed => Flags::UF,
            Failure::Timeout => Flags::UT,
            Failure::UpstreamReset => Flags::UC,
            Failure::AbortHttp(_) | Failure::AbortGrpc(_) => Flags::FI,
            Failure::AmbiguousFraming
            | Failure::BadRedirect
            | Failure::BadRequestTarget
            | Failure::BadHost
            | Failure::BadPath(_)
            | Failure::UriTooLong
            | Failure::TooManyHeaders
            | Failure::BadRequestBody => Flags::BR,
            Failure::Denied | Failure::MtlsRequired => Flags::RBAC,
            Failure::ClientAborted => Flags::DC,
            Failure::RequestBodyTimeout => Flags::SI,
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Failure::NoConfig | Failure::NoHealthyUpstream | Failure::Overflow | Failure::ConnectFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::UpstreamReset => StatusCode::BAD_GATEWAY,
            Failure::AbortHttp(s) => s,
            // Trailers-only gRPC answers are 200; the status is in `grpc-status`.
            Failure::AbortGrpc(_) => StatusCode::OK,
            Failure::AmbiguousFraming
            | Failure::BadRedirect
            | Failure::BadRequestTarget
            | Failure::BadHost
            | Failure::BadPath(_)
            | Failure::BadRequestBody => StatusCode::BAD_REQUEST,
            Failure::Denied | Failure::MtlsRequired => StatusCode::FORBIDDEN,
            Failure::UriTooLong => StatusCode::URI_TOO_LONG,
            Failure::TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Failure::ClientAborted => {
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
            }
            Failure::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The `x-weft-error` value and the text body.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::NoConfig => "no config loaded",
            Failure::NoRoute => "no route",
            Failure::NoHealthyUpstream => "no healthy upstream",
            Failure::Overflow => "upstream overflow: a connection-pool limit was reached",
            Failure::ConnectFailed => "upstream connect error",
            Failure::Timeout => "upstream request timeout",
            Failure::UpstreamReset => "upstream connection error",
            Failure::AbortHttp(_) | Failure::AbortGrpc(_) => "fault injected",
            Failure::AmbiguousFraming => "ambiguous message framing",
            Failure::BadRedirect => "bad redirect",
            Failure::BadRequestTarget => "bad request target",
            Failure::BadHost => "bad host",
            Failure::BadPath(super::normalize::Refused::EncodedSlash) => {
                "bad path: encoded slash or backslash"
            }
            Failure::BadPath(super::normalize::Refused::BadEscape) => "bad path: malformed percent-encoding",
            Failure::BadPath(super::normalize::Refused::NotAbsolute) => "bad path: not absolute",
            Failure::BadPath(super::normalize::Refused::DotSegmentParameters) => {
                "bad path: dot segment with parameters"
            }
            Failure::Denied => "denied by authorization policy",
            Failure::MtlsRequired => "mutual TLS required",
            Failure::UriTooLong => URI_TOO_LONG,
            Failure::TooManyHeaders => "too many request headers",
            Failure::BadRequestBody => "malformed request body",
            Failure::ClientAborted => "client closed the request before its body ended",
            Failure::RequestBodyTimeout => "request body timeout",
        }
    }

    /// The gRPC status a gRPC client gets (the usual HTTP-to-gRPC mapping; a timeout is a
    /// deadline).
    pub fn grpc_status(self) -> u32 {
        match self {
            Failure::AbortGrpc(code) => code,
            Failure::Timeout => 4,
            Failure::NoRoute => 12,
            Failure::AbortHttp(s) => match s.as_u16() {
                400 => 13,
                401 => 16,
                403 => 7,
                404 => 12,
                429 | 502..=504 => 14,
                _ => 2,
            },
            Failure::AmbiguousFraming
            | Failure::BadRedirect
            | Failure::BadRequestTarget
            | Failure::BadHost
            | Failure::BadPath(_)
            | Failure::BadRequestBody
            | Failure::TooManyHeaders
            | Failure::UriTooLong => 13,
            Failure::Denied | Failure::MtlsRequired => 7,
            // CANCELLED and DEADLINE_EXCEEDED, as a gRPC server reports them.
            Failure::ClientAborted => 1,
            Failure::RequestBodyTimeout => 4,
            Failure::NoConfig
            | Failure::NoHealthyUpstream
            | Failure::Overflow
            | Failure::ConnectFailed
            | Failure::UpstreamReset => 14,
        }
    }
}

/// `Failure::UriTooLong`'s reason, also in the answer `http::limits` writes itself.
pub const URI_TOO_LONG: &str = "uri too long";

static X_WEFT_ERROR: http::HeaderName = http::HeaderName::from_static("x-weft-error");

/// The proxy's own answer for `failure`, carrying `info` (with the failure's flags added) for the
/// access log and metrics.
pub fn respond(failure: Failure, grpc: bool, mut info: ResponseInfo) -> Response<Body> {
    info.flags |= failure.flags();
    let reason = failure.reason();
    let mut res = if grpc {
        let mut res = Response::new(empty());
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(failure.grpc_status()));
        h.insert("grpc-message", HeaderValue::from_static(reason));
        res
    } else {
        let mut res = Response::new(full(format!("{reason}\n")));
        *res.status_mut() = failure.status();
        res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        res
    };
    res.headers_mut().insert(X_WEFT_ERROR.clone(), HeaderValue::from_static(reason));
    // HTTP/1.1 only reads the next request once this one's body was read to its end.
    if matches!(
        failure,
        Failure::AmbiguousFraming
            | Failure::BadHost
            | Failure::MtlsRequired
            | Failure::BadRequestBody
            | Failure::ClientAborted
            | Failure::RequestBodyTimeout
    ) {
        res.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    res.extensions_mut().insert(info);
    res
}

/// Whether a request is gRPC (its errors are then gRPC statuses). gRPC runs on HTTP/2 only,
/// so HTTP/1.1 requests skip the header lookup.
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.version() == http::Version::HTTP_2
        && req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_get_a_trailers_only_status() {
        let res = respond(Failure::Overflow, true, ResponseInfo::default());
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(res.headers()["x-weft-error"], Failure::Overflow.reason());
        assert!(res.extensions().get::<ResponseInfo>().unwrap().flags.contains(Flags::UO));
        let res = respond(Failure::AbortHttp(StatusCode::IM_A_TEAPOT), false, ResponseInfo::default());
        assert_eq!(res.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(
            respond(Failure::AbortGrpc(8), true, ResponseInfo::default()).headers()["grpc-status"],
            "8"
        );
    }
}
