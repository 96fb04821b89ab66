//! HTTP proxying: the downstream server (`server`), the request path as tower layers
//! (`headers::RequestIdLayer`, `observe` for metrics and access logs, then `router`), and header
//! rules (`headers`).
//!
//! Later policies (retries, timeouts, faults, authorization) are layers between `observe` and
//! `router`, or around the upstream call inside `router`.

pub mod headers;
pub mod observe;
pub mod router;
pub mod server;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Errors carried in bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type on both sides of the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Wraps any body into `Body`.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Where a connection came from and where it was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    Explicit,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Explicit => "explicit",
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that keeps `guard` alive until it ends or is dropped (e.g. an endpoint's pending
    /// request count).
    pub struct WithGuard<G> {
        #[pin]
        inner: Body,
        guard: Option<G>,
    }
}

impl<G> WithGuard<G> {
    pub fn new(inner: Body, guard: G) -> Self {
        WithGuard { inner, guard: Some(guard) }
    }
}

impl<G> http_body::Body for WithGuard<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = &polled {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Ends a response body with an error once the route's deadline passes, so the route
    /// timeout bounds the whole response (as Envoy's does), not only the wait for its headers.
    /// The client then sees the stream reset (HTTP/2) or the connection closed (HTTP/1.1).
    pub struct Deadline {
        #[pin]
        inner: Body,
        #[pin]
        sleep: tokio::time::Sleep,
        expired: bool,
    }
}

impl Deadline {
    pub fn new(inner: Body, deadline: tokio::time::Instant) -> Self {
        Deadline { inner, sleep: tokio::time::sleep_until(deadline), expired: false }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.expired {
            return std::task::Poll::Ready(None);
        }
        if this.sleep.poll(cx).is_ready() {
            *this.expired = true;
            return std::task::Poll::Ready(Some(Err(
                "route timeout passed while the response was streaming".into(),
            )));
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
