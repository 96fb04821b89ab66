//! I/O wrappers: replaying bytes read during protocol detection, and recording activity (last
//! read or write, byte counts) for idle timeouts and TCP metrics; on HTTP/1.1 connections, also
//! measuring request lines as they arrive (`http::limits::RequestLine`).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use crate::http::limits::{RequestLine, URI_TOO_LONG_ANSWER};

pin_project_lite::pin_project! {
    /// Reads `prefix` first, then from `inner`; writes go straight to `inner`.
    #[derive(Debug)]
    pub struct PrefixedIo<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        PrefixedIo { prefix, inner }
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// When a connection last moved bytes, how many, how many requests it has in flight, and since
/// when it has been reading a request head.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    pub read: AtomicU64,
    pub written: AtomicU64,
    requests: AtomicUsize,
    /// Milliseconds since `epoch` (plus one) of the first byte read with no request in flight;
    /// zero when no request head is being read.
    head_since: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Records a read; true when it is the first of a request head.
    fn on_read(&self, n: usize) -> bool {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        let now = self.now_ms(); // one clock read for both stamps
        self.last_ms.store(now, Ordering::Relaxed);
        self.requests.load(Ordering::Acquire) == 0
            && self.head_since.compare_exchange(0, now + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// A request head was parsed and the request starts.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
    }

    pub fn request_finished(&self) {
        self.requests.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }

    /// Resolves when a request head has been arriving for longer than `limit` (slowloris).
    pub async fn head_timeout(&self, limit: Duration) {
        loop {
            let since = self.head_since.load(Ordering::Acquire);
            let wake = match since {
                0 => Instant::now() + limit,
                ms => self.epoch + Duration::from_millis(ms - 1) + limit,
            };
            tokio::time::sleep_until(wake).await;
            if since != 0 && self.head_since.load(Ordering::Acquire) == since {
                return;
            }
        }
    }

    /// When bytes last moved.
    pub fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `idle` while `busy()` is false.
    pub async fn idle(&self, idle: Duration, busy: impl Fn() -> bool) {
        loop {
            let deadline = self.last() + idle;
            tokio::time::sleep_until(deadline).await;
            if self.last() + idle <= Instant::now() && !busy() {
                return;
            }
            if busy() {
                // A request in flight counts as activity.
                self.touch();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Records reads and writes into an `Activity`.
    #[derive(Debug)]
    pub struct ActivityIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        // HTTP/1.1 only (boxed: other connections do not carry it).
        request_line: Option<Box<LineGuard>>,
    }
}

/// An HTTP/1.1 connection's request-line limit, and the 414 answer once it was passed.
#[derive(Debug)]
struct LineGuard {
    line: RequestLine,
    /// Bytes of the answer written, once refusing.
    refusing: Option<usize>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
        ActivityIo { inner, activity, request_line: None }
    }

    /// HTTP/1.1: a request line still unfinished past `line`'s limit is answered 414 here and
    /// the connection ends (the reader sees EOF), before hyper sees the line.
    pub fn limit_request_line(mut self, line: RequestLine) -> Self {
        self.request_line = Some(Box::new(LineGuard { line, refusing: None }));
        self
    }
}

/// Writes the 414 answer on `inner`; ready once it is written and flushed.
fn refuse<T: AsyncWrite>(
    mut inner: Pin<&mut T>,
    cx: &mut Context<'_>,
    written: &mut usize,
    activity: &Activity,
) -> Poll<io::Result<()>> {
    while let Some(rest) = URI_TOO_LONG_ANSWER.get(*written..).filter(|r| !r.is_empty()) {
        let n = std::task::ready!(inner.as_mut().poll_write(cx, rest))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *written += n;
        activity.written.fetch_add(n as u64, Ordering::Relaxed);
    }
    inner.poll_flush(cx)
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for ActivityIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if let Some(LineGuard { refusing: Some(written), .. }) = this.request_line.as_deref_mut() {
            return refuse(this.inner, cx, written, this.activity);
        }
        let before = buf.filled().len();
        let res = this.inner.as_mut().poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let head_started = this.activity.on_read(n);
            if let Some(guard) = this.request_line.as_deref_mut() {
                if head_started {
                    guard.line.head_started();
                }
                if guard.line.too_long(&buf.filled()[before..]) {
                    tracing::debug!(limit = guard.line.max(), "request line too long; answering 414");
                    // hyper never sees the line: it reads EOF once the answer is out.
                    buf.set_filled(before);
                    let written = guard.refusing.insert(0);
                    return refuse(this.inner, cx, written, this.activity);
                }
            }
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for ActivityIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            this.activity.written.fetch_add(*n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        res
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            this.activity.written.fetch_add(*n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn prefix_is_replayed_before_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut io = PrefixedIo::new(Bytes::from_static(b"hello"), a);
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test(start_paused = true)]
    async fn head_timeout_starts_at_the_first_byte_and_stops_with_the_request() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ActivityIo::new(a, activity.clone());
        let limit = Duration::from_secs(10);
        // Idle: no deadline however long it waits.
        let idle = tokio::time::timeout(Duration::from_secs(60), activity.head_timeout(limit)).await;
        assert!(idle.is_err(), "no head being read, no timeout");
        // A partial head starts the clock.
        b.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 8];
        io.read_exact(&mut buf).await.unwrap();
        let start = Instant::now();
        activity.head_timeout(limit).await;
        assert_eq!(start.elapsed(), limit);
        // Once the request starts, the head clock is off until the next head's first byte.
        activity.request_started();
        let busy = tokio::time::timeout(Duration::from_secs(60), activity.head_timeout(limit)).await;
        assert!(busy.is_err());
        activity.request_finished();
        assert_eq!(activity.requests(), 0);
    }

    #[tokio::test]
    async fn an_unfinished_request_line_past_the_limit_is_answered_414_and_read_as_eof() {
        let (a, mut client) = tokio::io::duplex(64 * 1024);
        let mut io = ActivityIo::new(a, Activity::new()).limit_request_line(RequestLine::new(100, 64 * 1024));
        client.write_all(b"GET /").await.unwrap();
        client.write_all(&[b'a'; 300]).await.unwrap();
        let mut read = Vec::new();
        io.read_to_end(&mut read).await.unwrap();
        assert!(read.len() < 170, "the reader never sees the line past the limit: {} bytes", read.len());
        let mut answer = vec![0u8; URI_TOO_LONG_ANSWER.len()];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, URI_TOO_LONG_ANSWER);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_quiet_time_and_not_while_busy() {
        let activity = Activity::new();
        let (a, _b) = tokio::io::duplex(64);
        let mut io = ActivityIo::new(a, activity.clone());
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        io.write_all(b"x").await.unwrap();
        activity.idle(Duration::from_secs(10), || false).await;
        assert_eq!(start.elapsed(), Duration::from_secs(15), "10 s after the last write");
        assert_eq!(activity.written.load(Ordering::Relaxed), 1);

        let busy = std::sync::atomic::AtomicBool::new(true);
        let busy_ref = &busy;
        let until = Instant::now() + Duration::from_secs(30);
        let t = Instant::now();
        tokio::join!(activity.idle(Duration::from_secs(10), || busy_ref.load(Ordering::Relaxed)), async {
            tokio::time::sleep_until(until).await;
            busy.store(false, Ordering::Relaxed);
        });
        assert!(t.elapsed() >= Duration::from_secs(30), "not idle while busy");
    }
}
