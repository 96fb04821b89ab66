//! The client's request body on its way upstream, watched. When a try fails because that body
//! failed (bad chunked framing, the client gone, a stall), hyper reports it as a failed send much
//! like an upstream that broke; the `Watch` tells the two apart, so the client gets 400, 408 or
//! 499 and the upstream is not blamed (no `UC`, no 5xx in its metrics, no outlier ejection).
//!
//! The body also ends with an error when no bytes came for the request-body timeout while the
//! proxy was waiting for them (nginx's `client_body_timeout`, 60 s there), or when it arrives
//! slower than the minimum rate on average (Apache's `mod_reqtimeout`, `body=20,MinRate=500` there):
//! the proxy waits for the body at most the timeout plus one second per `min_rate` bytes
//! received, in total. Both clocks run only until the upstream's answer starts and only while the
//! proxy waits for the client: time the upstream spends not reading does not count, and neither
//! does anything after its answer started, so a gRPC stream may then be quiet for as long as it
//! likes.

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
    /// No bytes came for the request-body timeout, or they came slower than the minimum rate.
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
pub enum Stalled {
    #[error("no request body bytes from the client for {0:?}")]
    Idle(Duration),
    #[error(
        "request body slower than {min_rate} bytes/s: {received} bytes in {waited:?} of waiting for the client"
    )]
    TooSlow { min_rate: u32, received: u64, waited: Duration },
}

/// How fast a body must arrive while the proxy waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyPace {
    /// The longest wait for the next bytes, and the grace of the rate; zero: no limit at all.
    pub timeout: Duration,
    /// Bytes per second, on average over the time spent waiting; zero: only the timeout.
    pub min_rate: u32,
}

impl BodyPace {
    /// No limit (gRPC).
    pub const OFF: BodyPace = BodyPace { timeout: Duration::ZERO, min_rate: 0 };
}

/// Which limit ends a wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    Idle,
    Rate,
}

/// How long the proxy may wait for the body's next bytes, having received `received` bytes in
/// `waited` of waiting: the timeout, and no more than what is left of the total allowance (the
/// timeout plus `received / min_rate` seconds). Pure: the caller brings the clock.
fn next_wait(pace: BodyPace, received: u64, waited: Duration) -> (Duration, Bound) {
    if pace.min_rate == 0 {
        return (pace.timeout, Bound::Idle);
    }
    let earned_ns = u128::from(received) * 1_000_000_000 / u128::from(pace.min_rate);
    let earned = Duration::from_nanos(u64::try_from(earned_ns).unwrap_or(u64::MAX));
    let left = pace.timeout.saturating_add(earned).saturating_sub(waited);
    if left < pace.timeout { (left, Bound::Rate) } else { (pace.timeout, Bound::Idle) }
}

pin_project_lite::pin_project! {
    /// The client's body, recording its fault in the `Watch` and ending with `Stalled` when it
    /// stops arriving or arrives too slowly.
    pub struct WatchedBody {
        #[pin]
        inner: Body,
        watch: Arc<Watch>,
        pace: BodyPace,
        // Reused across waits; boxed, and only made once the body has to be waited for.
        stall: Option<Pin<Box<Sleep>>>,
        // The last poll found no bytes: the proxy is waiting for the client since then (`stall`
        // is armed), bound by the given limit.
        waiting: Option<(Instant, Bound)>,
        // Data bytes received, and the time spent waiting for them (closed waits only).
        received: u64,
        waited: Duration,
        ended: bool,
    }
}

impl WatchedBody {
    pub fn new(inner: Body, pace: BodyPace) -> (WatchedBody, Arc<Watch>) {
        let watch = Arc::new(Watch::default());
        let body = WatchedBody {
            inner,
            watch: watch.clone(),
            pace,
            stall: None,
            waiting: None,
            received: 0,
            waited: Duration::ZERO,
            ended: false,
        };
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
                if let Some((since, _)) = this.waiting.take() {
                    *this.waited += since.elapsed();
                }
                *this.received += frame.data_ref().map_or(0, |d| d.len() as u64);
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
                if this.pace.timeout.is_zero() || this.watch.is_answered() {
                    return Poll::Pending;
                }
                // The clock starts when the proxy starts waiting, not when it last read: the
                // time in between was the upstream's.
                let (since, bound) = match *this.waiting {
                    Some(waiting) => waiting,
                    None => {
                        let now = Instant::now();
                        let (wait, bound) = next_wait(*this.pace, *this.received, *this.waited);
                        *this.waiting = Some((now, bound));
                        match this.stall.as_mut() {
                            Some(stall) => stall.as_mut().reset(now + wait),
                            None => *this.stall = Some(Box::pin(tokio::time::sleep_until(now + wait))),
                        }
                        (now, bound)
                    }
                };
                let stalled = this.stall.as_mut().is_some_and(|s| s.as_mut().poll(cx).is_ready());
                if !stalled {
                    return Poll::Pending;
                }
                *this.ended = true;
                let error = match bound {
                    Bound::Idle => Stalled::Idle(this.pace.timeout),
                    Bound::Rate => Stalled::TooSlow {
                        min_rate: this.pace.min_rate,
                        received: *this.received,
                        waited: *this.waited + since.elapsed(),
                    },
                };
                tracing::debug!(%error, "request body stalled; ending the request");
                this.watch.fail(Fault::Stalled);
                Poll::Ready(Some(Err(Box::new(error))))
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

    fn idle_only(timeout: Duration) -> BodyPace {
        BodyPace { timeout, min_rate: 0 }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_ends_the_body_after_the_timeout_counted_from_the_wait() {
        let (tx, inner) = channel();
        let (mut body, watch) = WatchedBody::new(inner, idle_only(Duration::from_secs(30)));
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
        let (mut body, watch) = WatchedBody::new(inner, idle_only(Duration::from_secs(30)));
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

    #[test]
    fn the_wait_is_the_timeout_capped_by_what_is_left_of_the_rate_allowance() {
        let pace = BodyPace { timeout: Duration::from_secs(30), min_rate: 500 };
        let secs = Duration::from_secs;
        assert_eq!(next_wait(pace, 0, Duration::ZERO), (secs(30), Bound::Idle));
        assert_eq!(next_wait(BodyPace { min_rate: 0, ..pace }, 0, secs(3600)), (secs(30), Bound::Idle));
        // Fast so far: 1 MB earned 2,000 s; the idle timeout still bounds a single wait.
        assert_eq!(next_wait(pace, 1_000_000, secs(5)), (secs(30), Bound::Idle));
        // Six bytes in 30 s of waiting earned 12 ms past the grace.
        assert_eq!(next_wait(pace, 6, secs(30)), (Duration::from_millis(12), Bound::Rate));
        assert_eq!(next_wait(pace, 1, secs(5)), (Duration::from_millis(25_002), Bound::Rate));
        assert_eq!(next_wait(pace, 6, secs(60)), (Duration::ZERO, Bound::Rate));
        assert_eq!(next_wait(BodyPace { min_rate: 1, ..pace }, u64::MAX, secs(60)), (secs(30), Bound::Idle));
    }

    /// The client: `Content-Length: 100000`, then 1 byte every 5 s. Each wait is well
    /// under the 30 s timeout, but at 500 bytes/s the whole body may take only 30 s of waiting
    /// plus 2 ms per byte: the sixth byte (30 s) leaves 12 ms.
    #[tokio::test(start_paused = true)]
    async fn a_body_trickling_below_the_minimum_rate_is_cut_after_the_grace() {
        let (tx, inner) = channel();
        let (mut body, watch) =
            WatchedBody::new(inner, BodyPace { timeout: Duration::from_secs(30), min_rate: 500 });
        let feed = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if tx.send(Ok(Bytes::from_static(b"a"))).await.is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        let mut received = 0;
        let error = loop {
            match body.frame().await.unwrap() {
                Ok(_) if received < 100 => received += 1,
                Ok(_) => panic!("100 bytes in 500 s and still not cut"),
                Err(error) => break error,
            }
        };
        assert_eq!(started.elapsed(), Duration::from_millis(30_012));
        assert_eq!(received, 6);
        assert!(
            matches!(
                error.downcast_ref::<Stalled>(),
                Some(Stalled::TooSlow { min_rate: 500, received: 6, .. })
            ),
            "{error}"
        );
        assert_eq!(watch.fault(), Some(Fault::Stalled));
        drop(body);
        feed.await.unwrap();
    }

    /// Time the upstream spends not reading is not the client's: a body that came in a trickle
    /// while nobody read it is not cut, however slow it was in wall-clock time.
    #[tokio::test(start_paused = true)]
    async fn only_the_time_spent_waiting_for_the_client_counts_against_the_rate() {
        let (tx, inner) = channel();
        let (mut body, watch) =
            WatchedBody::new(inner, BodyPace { timeout: Duration::from_secs(30), min_rate: 500 });
        let feed = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
            }
        });
        for _ in 0..20 {
            assert!(body.frame().await.unwrap().is_ok());
            // The upstream is busy for a minute: the channel holds what the client sends.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        assert_eq!(watch.fault(), None);
        feed.await.unwrap();
    }

    /// A body at or above the minimum rate is never cut, however long it takes.
    #[tokio::test(start_paused = true)]
    async fn a_body_above_the_minimum_rate_arrives_whole() {
        let (tx, inner) = channel();
        let (mut body, watch) =
            WatchedBody::new(inner, BodyPace { timeout: Duration::from_secs(30), min_rate: 500 });
        let feed = tokio::spawn(async move {
            // An hour at 510 bytes/s, in bursts of 5,100 bytes every 10 s.
            for _ in 0..360 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                tx.send(Ok(Bytes::from(vec![b'a'; 5_100]))).await.unwrap();
            }
        });
        for _ in 0..360 {
            assert!(body.frame().await.unwrap().is_ok());
        }
        assert_eq!(watch.fault(), None);
        feed.await.unwrap();
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
            (Box::new(Stalled::Idle(Duration::from_secs(1))), Fault::Stalled),
            ("something else".into(), Fault::Aborted),
        ] {
            let (tx, inner) = channel();
            let (mut body, watch) = WatchedBody::new(inner, BodyPace::OFF);
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
