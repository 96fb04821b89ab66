//! The client's request body on its way upstream, watched. When a try fails because that body
//! failed (bad chunked framing, the client gone, a stall), hyper reports it as a failed send much
//! like an upstream that broke; the `Watch` tells the two apart, so the client gets 400, 408 or
//! 499 and the upstream is not blamed (no `UC`, no 5xx in its metrics, no outlier ejection).
//!
//! The body also ends with an error when no bytes came for the request-body timeout while the
//! proxy was waiting for them, until the upstream's answer starts (nginx's
//! `client_body_timeout`, 60 s there). Time the upstream spends not reading does not count, and
//! neither does anything after its answer started: a gRPC stream may then be quiet for as long
//! as it likes.

use std::{
    error::Error as StdError,
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{Body, BoxError, error::Failure};

/// What went wrong with the client's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The body broke its framing (HTTP/1.1 chunked coding, HTTP/2 stream protocol errors).
    Malformed,
    /// The client closed the connection or reset the stream before the body ended.
    Aborted,
    /// No bytes came for the request-body timeout.
    Stalled,
}

impl Fault {
    const ALL: [Fault; 3] = [Fault::Malformed, Fault::Aborted, Fault::Stalled];

    pub fn failure(self) -> Failure {
        match self {
            Fault::Malformed => Failure::BadRequestBody,
            Fault::Aborted => Failure::ClientAborted,
            Fault::Stalled => Failure::RequestBodyTimeout,
        }
    }

    /// What an error from the downstream connection's body says about the client: a framing
    /// error hyper or h2 detected is `Malformed`, anything else (EOF, reset, I/O) `Aborted`.
    pub fn of(error: &(dyn StdError + 'static)) -> Fault {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if e.is::<Stalled>() {
                return Fault::Stalled;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => Fault::Malformed,
                    _ => Fault::Aborted,
                };
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                // A stream or connection error h2 detected in what the client sent.
                return if h2.is_library() { Fault::Malformed } else { Fault::Aborted };
            }
            cause = e.source();
        }
        Fault::Aborted
    }

    fn code(self) -> u8 {
        match self {
            Fault::Malformed => 1,
            Fault::Aborted => 2,
            Fault::Stalled => 3,
        }
    }
}

/// Set when the upstream's answer started: the body's clock stops.
const ANSWERED: u8 = 0x80;

/// Shared by a `WatchedBody` (in the connection task that sends it) and the try that waits for
/// the answer.
#[derive(Debug, Default)]
pub struct Watch(AtomicU8);

impl Watch {
    /// The body's fault, if it failed.
    pub fn fault(&self) -> Option<Fault> {
        let code = self.0.load(Ordering::Acquire) & !ANSWERED;
        Fault::ALL.into_iter().find(|f| f.code() == code)
    }

    /// The upstream's answer started.
    pub fn answered(&self) {
        self.0.fetch_or(ANSWERED, Ordering::AcqRel);
    }

    fn is_answered(&self) -> bool {
        self.0.load(Ordering::Acquire) & ANSWERED != 0
    }

    /// Records the first fault.
    fn fail(&self, fault: Fault) {
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v & !ANSWERED == 0).then_some(v | fault.code())
        });
    }
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no request body bytes from the client for {0:?}")]
pub struct Stalled(pub Duration);

pin_project_lite::pin_project! {
    /// The client's body, recording its fault in the `Watch` and ending with `Stalled` when it
    /// stops arriving.
    pub struct WatchedBody {
        #[pin]
        inner: Body,
        watch: Arc<Watch>,
        // Zero: no timeout.
        timeout: Duration,
        // Reused across waits; boxed, and only made once the body has to be waited for.
        stall: Option<Pin<Box<Sleep>>>,
        // The last poll found no bytes: the proxy is waiting for the client (`stall` is armed).
        waiting: bool,
        ended: bool,
    }
}

impl WatchedBody {
    pub fn new(inner: Body, timeout: Duration) -> (WatchedBody, Arc<Watch>) {
        let watch = Arc::new(Watch::default());
        let body =
            WatchedBody { inner, watch: watch.clone(), timeout, stall: None, waiting: false, ended: false };
        (body, watch)
    }
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                *this.ended = true;
                let fault = Fault::of(&*error);
                tracing::debug!(%error, ?fault, "request body failed");
                this.watch.fail(fault);
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                *this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.timeout.is_zero() || this.watch.is_answered() {
                    return Poll::Pending;
                }
                // The clock starts when the proxy starts waiting, not when it last read: the
                // time in between was the upstream's.
                if !*this.waiting {
                    *this.waiting = true;
                    let deadline = Instant::now() + *this.timeout;
                    match this.stall.as_mut() {
                        Some(stall) => stall.as_mut().reset(deadline),
                        None => *this.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let stalled = this.stall.as_mut().is_some_and(|s| s.as_mut().poll(cx).is_ready());
                if !stalled {
                    return Poll::Pending;
                }
                *this.ended = true;
                tracing::debug!(timeout = ?this.timeout, "request body stalled; ending the request");
                this.watch.fail(Fault::Stalled);
                Poll::Ready(Some(Err(Box::new(Stalled(*this.timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;

    /// A body fed from a channel: each item a frame or an error.
    fn channel() -> (mpsc::Sender<Result<Bytes, BoxError>>, Body) {
        let (tx, rx) = mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let body = http_body_util::StreamBody::new(tokio_stream::StreamExt::map(
            stream,
            |r: Result<Bytes, BoxError>| r.map(Frame::data),
        ));
        (tx, body.boxed_unsync())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_ends_the_body_after_the_timeout_counted_from_the_wait() {
        let (tx, inner) = channel();
        let (mut body, watch) = WatchedBody::new(inner, Duration::from_secs(30));
        tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // Ten minutes nobody reads (the upstream is busy): not the client's time.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(error.is::<Stalled>(), "{error}");
        assert_eq!(watch.fault(), Some(Fault::Stalled));
        assert!(body.frame().await.is_none(), "ended");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_in_time_keep_it_going_and_an_answer_stops_the_clock() {
        let (tx, inner) = channel();
        let (mut body, watch) = WatchedBody::new(inner, Duration::from_secs(30));
        let feed = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
            }
            tx
        });
        for _ in 0..5 {
            assert!(body.frame().await.unwrap().is_ok());
        }
        watch.answered();
        let quiet = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
        assert!(quiet.is_err(), "no timeout once the upstream answered");
        assert_eq!(watch.fault(), None);
        drop(feed.await.unwrap());
    }

    #[tokio::test]
    async fn body_errors_are_classified() {
        let io = |kind| -> BoxError { Box::new(std::io::Error::new(kind, "x")) };
        for (error, fault) in [
            (io(std::io::ErrorKind::InvalidInput), Fault::Malformed),
            (io(std::io::ErrorKind::InvalidData), Fault::Malformed),
            (io(std::io::ErrorKind::UnexpectedEof), Fault::Aborted),
            (io(std::io::ErrorKind::ConnectionReset), Fault::Aborted),
            (Box::new(h2::Error::from(h2::Reason::CANCEL)), Fault::Aborted),
            (Box::new(Stalled(Duration::from_secs(1))), Fault::Stalled),
            ("something else".into(), Fault::Aborted),
        ] {
            let (tx, inner) = channel();
            let (mut body, watch) = WatchedBody::new(inner, Duration::ZERO);
            tx.send(Err(error)).await.unwrap();
            assert!(body.frame().await.unwrap().is_err());
            assert_eq!(watch.fault(), Some(fault));
        }
        let watch = Watch::default();
        watch.fail(Fault::Malformed);
        watch.fail(Fault::Aborted);
        watch.answered();
        assert_eq!(watch.fault(), Some(Fault::Malformed), "the first fault stays");
    }
}
