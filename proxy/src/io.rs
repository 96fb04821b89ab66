//! I/O wrappers: replaying bytes read during protocol detection, and recording activity (last
//! read or write, byte counts) for idle timeouts and TCP metrics; on HTTP/1.1 connections, also
//! measuring request lines as they arrive (`http::limits::RequestLine`); on HTTP/2 connections,
//! budgeting the frames that carry no request (`h2_frames`).

use std::{
    io,
    ops::ControlFlow,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use crate::{
    h2_frames::{self, ControlBudget, FrameCursor},
    http::limits::{RequestLine, URI_TOO_LONG_ANSWER},
};

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

    /// Whether bytes are waiting to be replayed.
    pub fn has_prefix(&self) -> bool {
        self.prefix.has_remaining()
    }

    /// Replays `bytes` before what is left of the prefix.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return; // an empty view may still hold the buffer it was cut from
        }
        self.prefix = if self.prefix.has_remaining() {
            let mut joined = bytes::BytesMut::from(&bytes[..]);
            joined.extend_from_slice(&self.prefix);
            joined.freeze()
        } else {
            bytes
        };
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if !this.prefix.has_remaining() {
                // An empty view still holds the buffer it was cut from (detection's, hyper's).
                *this.prefix = Bytes::new();
            }
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
    /// The proxy ended this HTTP/2 connection for a flood of frames that carry no request.
    h2_flood: AtomicBool,
    /// Requests finished on this connection.
    served: AtomicU64,
    /// Parking: zero when not asked; while asked (`request_park`), the bytes moved so far plus
    /// one; `PARKED` once hyper let go with no byte moved since (`ActivityIo` then skipped its
    /// shutdown).
    park: AtomicU64,
}

/// `Activity::park` once the connection is parked.
const PARKED: u64 = u64::MAX;

/// What a connection's timer watches for (`Activity::due`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Watch {
    /// Nothing moved for this long, with no request in flight (one in flight counts as activity).
    pub idle: Option<Duration>,
    /// A request head has been arriving for longer than this since its first byte (slowloris).
    pub head: Option<Duration>,
    /// An HTTP/1 connection idle between requests, to park.
    pub park: Option<Park>,
}

impl Watch {
    pub fn idle(idle: Duration) -> Watch {
        Watch { idle: Some(idle), ..Watch::default() }
    }
}

/// Parking watch: a request served after the first `served_before` has finished, none is in
/// flight, and nothing has moved for `quiet`.
#[derive(Clone, Copy, Debug)]
pub struct Park {
    pub quiet: Duration,
    pub served_before: u64,
}

/// What came due first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    Idle,
    Head,
    Park,
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
            h2_flood: AtomicBool::new(false),
            served: AtomicU64::new(0),
            park: AtomicU64::new(0),
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
        self.served.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_sub(1, Ordering::AcqRel);
    }

    /// Requests finished on this connection.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn moved(&self) -> u64 {
        self.read.load(Ordering::Relaxed) + self.written.load(Ordering::Relaxed)
    }

    /// The HTTP/1 server is about to be asked to let go of an idle connection: if it ends the
    /// connection before another byte moves, its shutdown is skipped and the socket stays open
    /// (`parked`). A byte moved since means it was not idle after all (it finished writing a
    /// response, or the client asked to close): the connection then shuts down as usual.
    pub fn request_park(&self) {
        self.park.store(self.moved() + 1, Ordering::Relaxed);
    }

    /// Whether the HTTP/1 server let go of the connection without closing it; clears the request.
    pub fn take_parked(&self) -> bool {
        self.park.swap(0, Ordering::Relaxed) == PARKED
    }

    /// Called instead of a shutdown: true when it is a park and the socket must stay open.
    fn shutdown_is_park(&self) -> bool {
        let asked = self.moved() + 1;
        self.park.compare_exchange(asked, PARKED, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }

    /// Whether the proxy ended this HTTP/2 connection for a flood of frames that carry no
    /// request (`ActivityIo::guard_h2_control_frames`).
    pub fn h2_flooded(&self) -> bool {
        self.h2_flood.load(Ordering::Relaxed)
    }

    /// When bytes last moved.
    pub fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves with the first of what `watch` watches for that is due. One timer serves them
    /// all: a connection's task polls it on every wake, so one sleep is cheaper than three.
    pub async fn due(&self, watch: Watch) -> Due {
        loop {
            let now = Instant::now();
            let mut wake: Option<Instant> = None;
            let mut at = |deadline: Instant| wake = Some(wake.map_or(deadline, |w| w.min(deadline)));
            if let Some(idle) = watch.idle {
                let deadline = self.last() + idle;
                if deadline > now {
                    at(deadline);
                } else if self.requests() == 0 {
                    return Due::Idle;
                } else {
                    // A request in flight counts as activity.
                    self.touch();
                    at(now + idle);
                }
            }
            if let Some(limit) = watch.head {
                match self.head_since.load(Ordering::Acquire) {
                    0 => at(now + limit),
                    ms => {
                        let deadline = self.epoch + Duration::from_millis(ms - 1) + limit;
                        if deadline <= now {
                            return Due::Head;
                        }
                        at(deadline);
                    }
                }
            }
            if let Some(park) = watch.park {
                let deadline = self.last() + park.quiet;
                if deadline > now {
                    at(deadline);
                } else if self.requests() == 0 && self.served() > park.served_before {
                    return Due::Park;
                } else {
                    at(now + park.quiet);
                }
            }
            match wake {
                Some(wake) => tokio::time::sleep_until(wake).await,
                None => std::future::pending().await,
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
        // HTTP/2 only.
        h2: Option<Box<H2Guard>>,
    }
}

/// An HTTP/2 server connection's frames both ways, the budget for frames that carry no
/// request, and the GOAWAY once it ran out.
#[derive(Debug)]
struct H2Guard {
    reads: FrameCursor,
    writes: FrameCursor,
    budget: ControlBudget,
    /// The highest stream the client opened, for the GOAWAY.
    last_stream: u32,
    /// Once over budget: the GOAWAY and how much of it is written.
    ending: Option<([u8; 17], usize)>,
}

impl H2Guard {
    /// Follows what the client sent; `Break` once it is over budget.
    fn read(&mut self, bytes: &[u8]) -> ControlFlow<()> {
        let H2Guard { reads, budget, last_stream, .. } = self;
        reads.feed(bytes, |head| {
            if head.kind == h2_frames::HEADERS {
                *last_stream = (*last_stream).max(head.stream);
            }
            budget.received(head, Instant::now)
        })
    }

    fn written(&mut self, bytes: &[u8]) {
        let H2Guard { writes, budget, .. } = self;
        let _ = writes.feed(bytes, |head| {
            budget.sent(head);
            ControlFlow::Continue(())
        });
    }

    /// Over budget: GOAWAY next, unless one of hyper's frames is half written (a GOAWAY inside
    /// it would garble both): then the connection just ends.
    fn end(&mut self) {
        let frame = h2_frames::goaway_enhance_your_calm(self.last_stream);
        let written = if self.writes.at_boundary() { 0 } else { frame.len() };
        self.ending = Some((frame, written));
    }
}

/// Writes the rest of the GOAWAY on `inner`; ready once it is written and flushed.
fn goaway<T: AsyncWrite>(
    inner: Pin<&mut T>,
    cx: &mut Context<'_>,
    (frame, written): &mut ([u8; 17], usize),
    activity: &Activity,
) -> Poll<io::Result<()>> {
    write_answer(inner, cx, frame, written, activity)
}

/// What hyper gets for its writes once the GOAWAY is out: the connection is over.
fn flood_ended() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "HTTP/2 connection ended for a control frame flood")
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
        ActivityIo { inner, activity, request_line: None, h2: None }
    }

    /// HTTP/2 server side: a client whose frames that carry no request (WINDOW_UPDATE, PRIORITY,
    /// PING, ...) outrun their budget gets GOAWAY ENHANCE_YOUR_CALM written here, and the
    /// connection ends (the reader sees EOF, writes fail) before hyper reads more of them.
    pub fn guard_h2_control_frames(mut self) -> Self {
        self.h2 = Some(Box::new(H2Guard {
            reads: FrameCursor::client(),
            writes: FrameCursor::server(),
            budget: ControlBudget::new(Instant::now()),
            last_stream: 0,
            ending: None,
        }));
        self
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
    inner: Pin<&mut T>,
    cx: &mut Context<'_>,
    written: &mut usize,
    activity: &Activity,
) -> Poll<io::Result<()>> {
    write_answer(inner, cx, URI_TOO_LONG_ANSWER, written, activity)
}

/// Writes what is left of `answer` after `written` bytes, then flushes: the proxy's own bytes
/// (a 414, a GOAWAY) written below hyper, counted as written.
fn write_answer<T: AsyncWrite>(
    mut inner: Pin<&mut T>,
    cx: &mut Context<'_>,
    answer: &[u8],
    written: &mut usize,
    activity: &Activity,
) -> Poll<io::Result<()>> {
    while let Some(rest) = answer.get(*written..).filter(|r| !r.is_empty()) {
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
        if let Some(H2Guard { ending: Some(ending), .. }) = this.h2.as_deref_mut() {
            // EOF once the GOAWAY is out.
            return goaway(this.inner, cx, ending, this.activity);
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
            if let Some(guard) = this.h2.as_deref_mut()
                && guard.read(&buf.filled()[before..]).is_break()
            {
                tracing::debug!(
                    burst = ControlBudget::BURST,
                    "HTTP/2 frames that carry no request over budget; GOAWAY ENHANCE_YOUR_CALM"
                );
                this.activity.h2_flood.store(true, Ordering::Relaxed);
                // hyper never sees this read: what it holds of the flood is all it gets.
                buf.set_filled(before);
                guard.end();
                let ending = guard.ending.as_mut().expect("just set");
                return goaway(this.inner, cx, ending, this.activity);
            }
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for ActivityIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        if let Some(H2Guard { ending: Some(ending), .. }) = this.h2.as_deref_mut() {
            std::task::ready!(goaway(this.inner, cx, ending, this.activity))?;
            return Poll::Ready(Err(flood_ended()));
        }
        let res = this.inner.as_mut().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            this.activity.written.fetch_add(*n as u64, Ordering::Relaxed);
            this.activity.touch();
            if let Some(guard) = this.h2.as_deref_mut() {
                guard.written(&buf[..*n]);
            }
        }
        res
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if let Some(H2Guard { ending: Some(ending), .. }) = this.h2.as_deref_mut() {
            std::task::ready!(goaway(this.inner.as_mut(), cx, ending, this.activity))?;
        }
        this.inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.activity.shutdown_is_park() {
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        if let Some(H2Guard { ending: Some(ending), .. }) = this.h2.as_deref_mut() {
            std::task::ready!(goaway(this.inner, cx, ending, this.activity))?;
            return Poll::Ready(Err(flood_ended()));
        }
        let res = this.inner.as_mut().poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            this.activity.written.fetch_add(*n as u64, Ordering::Relaxed);
            this.activity.touch();
            if let Some(guard) = this.h2.as_deref_mut() {
                let mut left = *n;
                for b in bufs {
                    if left == 0 {
                        break;
                    }
                    let take = left.min(b.len());
                    guard.written(&b[..take]);
                    left -= take;
                }
            }
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
        let head = Watch { head: Some(limit), ..Watch::default() };
        let idle = tokio::time::timeout(Duration::from_secs(60), activity.due(head)).await;
        assert!(idle.is_err(), "no head being read, no timeout");
        // A partial head starts the clock.
        b.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 8];
        io.read_exact(&mut buf).await.unwrap();
        let start = Instant::now();
        assert_eq!(activity.due(head).await, Due::Head);
        assert_eq!(start.elapsed(), limit);
        // Once the request starts, the head clock is off until the next head's first byte.
        activity.request_started();
        let busy = tokio::time::timeout(Duration::from_secs(60), activity.due(head)).await;
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

    fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream.to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    /// The preface, a request on stream 5, then more WINDOW_UPDATEs than its budget.
    fn h2_flood() -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x1, 0x5, 5, &[0x82]));
        for _ in 0..2 * ControlBudget::BURST {
            out.extend(h2_frame(0x8, 0, 0, &1u32.to_be_bytes()));
        }
        out
    }

    /// Reads what the guarded `io` lets through, 4 KiB at a time, until EOF.
    async fn read_through<T: AsyncRead + AsyncWrite + Unpin>(io: &mut ActivityIo<T>) -> usize {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            match io.read(&mut buf).await.unwrap() {
                0 => return total,
                n => total += n,
            }
        }
    }

    #[tokio::test]
    async fn an_h2_control_frame_flood_gets_goaway_and_reads_as_eof() {
        let (a, mut client) = tokio::io::duplex(1 << 20);
        let activity = Activity::new();
        let mut io = ActivityIo::new(a, activity.clone()).guard_h2_control_frames();
        let flood = h2_flood();
        client.write_all(&flood).await.unwrap();
        let through = read_through(&mut io).await;
        // The preface, the request, the budget (the burst and what the request earned), and at
        // most the rest of the 4 KiB read that ran it out.
        assert!(through < 24 + 10 + (ControlBudget::BURST as usize + 10) * 13 + 4096, "{through}");
        assert!(activity.h2_flooded());
        let mut goaway = [0u8; 17];
        client.read_exact(&mut goaway).await.unwrap();
        assert_eq!(goaway.to_vec(), h2_frame(0x7, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0xb]));
        let write = io.write(b"more").await.unwrap_err();
        assert_eq!(write.kind(), io::ErrorKind::ConnectionAborted);
        drop(io);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing after the GOAWAY: {rest:?}");
    }

    /// A GOAWAY in the middle of one of hyper's frames would garble both: the connection just
    /// ends.
    #[tokio::test]
    async fn no_goaway_in_the_middle_of_a_frame() {
        let (a, mut client) = tokio::io::duplex(1 << 20);
        let mut io = ActivityIo::new(a, Activity::new()).guard_h2_control_frames();
        let data = h2_frame(0x0, 0, 1, b"abc");
        io.write_all(&data[..10]).await.unwrap();
        client.write_all(&h2_flood()).await.unwrap();
        read_through(&mut io).await;
        drop(io);
        let mut sent = Vec::new();
        client.read_to_end(&mut sent).await.unwrap();
        assert_eq!(sent, data[..10]);
    }

    /// What the proxy sends earns what clients answer it with: a client acknowledging each of
    /// many DATA frames is not cut.
    #[tokio::test]
    async fn data_the_proxy_sends_earns_the_window_updates_it_brings() {
        let (a, mut client) = tokio::io::duplex(1 << 20);
        let activity = Activity::new();
        let mut io = ActivityIo::new(a, activity.clone()).guard_h2_control_frames();
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..3 * ControlBudget::BURST {
            io.write_all(&h2_frame(0x0, 0, 1, b"abc")).await.unwrap();
            let update = h2_frame(0x8, 0, 0, &3u32.to_be_bytes());
            client.write_all(&[update.clone(), update].concat()).await.unwrap();
            let mut got = 0;
            while got < 26 {
                let n = io.read(&mut buf).await.unwrap();
                assert!(n > 0, "cut off");
                got += n;
            }
        }
        assert!(!activity.h2_flooded());
    }

    #[tokio::test(start_paused = true)]
    async fn parking_waits_for_a_finished_request_and_quiet_time() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ActivityIo::new(a, activity.clone());
        let quiet = Duration::from_secs(1);
        let park = |served_before| Watch { park: Some(Park { quiet, served_before }), ..Watch::default() };
        // No request yet: never, however quiet.
        let early = tokio::time::timeout(Duration::from_secs(60), activity.due(park(0))).await;
        assert!(early.is_err(), "no request served, no parking");
        // A request in flight: not while it lasts.
        b.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 3];
        io.read_exact(&mut buf).await.unwrap();
        activity.request_started();
        let busy = tokio::time::timeout(Duration::from_secs(60), activity.due(park(0))).await;
        assert!(busy.is_err(), "a request in flight is not idle");
        // Finished: `quiet` after the last byte moved.
        activity.request_finished();
        io.write_all(b"200").await.unwrap();
        let answered = Instant::now();
        assert_eq!(activity.due(park(0)).await, Due::Park);
        assert_eq!(answered.elapsed(), quiet);
        // The same request does not count twice.
        let again = tokio::time::timeout(Duration::from_secs(60), activity.due(park(1))).await;
        assert!(again.is_err(), "no request since");
    }

    #[tokio::test]
    async fn a_park_skips_the_shutdown_only_while_no_byte_moves() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ActivityIo::new(a, activity.clone());
        // Parked: the shutdown is skipped, and the peer can still be written to.
        activity.request_park();
        io.shutdown().await.unwrap();
        assert!(activity.take_parked());
        io.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        b.read_exact(&mut buf).await.unwrap();
        // A byte moved after the request (hyper finished a response, say): a real shutdown.
        activity.request_park();
        io.write_all(b"y").await.unwrap();
        io.shutdown().await.unwrap();
        assert!(!activity.take_parked());
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"y", "EOF after the last byte");
        // No park requested: a real shutdown too.
        assert!(!activity.take_parked());
    }

    #[tokio::test]
    async fn unread_bytes_come_first_and_an_emptied_prefix_lets_go_of_its_buffer() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b"!").await.unwrap();
        drop(b);
        let mut buffer = bytes::BytesMut::with_capacity(4096);
        buffer.extend_from_slice(b"hello");
        let mut io = PrefixedIo::new(buffer.freeze(), a);
        let mut first = [0u8; 5];
        io.read_exact(&mut first).await.unwrap();
        assert!(!io.has_prefix());
        assert_eq!(io.prefix.as_ptr(), Bytes::new().as_ptr(), "the 4 KiB buffer is released");
        io.unread(Bytes::from_static(b" world"));
        io.unread(Bytes::new());
        let mut rest = String::new();
        io.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, " world!");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_quiet_time_and_not_while_busy() {
        let activity = Activity::new();
        let (a, _b) = tokio::io::duplex(64);
        let mut io = ActivityIo::new(a, activity.clone());
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        io.write_all(b"x").await.unwrap();
        assert_eq!(activity.due(Watch::idle(Duration::from_secs(10))).await, Due::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(15), "10 s after the last write");
        assert_eq!(activity.written.load(Ordering::Relaxed), 1);

        // A request in flight for 30 s: idle only 10 s after it ends.
        activity.request_started();
        let t = Instant::now();
        let (due, ()) = tokio::join!(activity.due(Watch::idle(Duration::from_secs(10))), async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            activity.request_finished();
        });
        assert_eq!(due, Due::Idle);
        assert!(t.elapsed() >= Duration::from_secs(30), "not idle while busy");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_watch_due_wins() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = ActivityIo::new(a, activity.clone());
        let all = |served_before| Watch {
            idle: Some(Duration::from_secs(300)),
            head: Some(Duration::from_secs(10)),
            park: Some(Park { quiet: Duration::from_millis(100), served_before }),
        };
        // A head's first bytes: the head deadline comes before the idle one.
        b.write_all(b"GE").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        let start = Instant::now();
        assert_eq!(activity.due(all(0)).await, Due::Head);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // Served and quiet: the park comes first.
        activity.request_started();
        activity.request_finished();
        let start = Instant::now();
        assert_eq!(activity.due(all(0)).await, Due::Park);
        assert!(start.elapsed() <= Duration::from_millis(100));
        // Nothing to park since: idle, 300 s after the last byte.
        assert_eq!(activity.due(all(1)).await, Due::Idle);
    }
}
