//! HTTP/2 frames that carry no request, budgeted. h2 answers every WINDOW_UPDATE, PRIORITY,
//! PING or SETTINGS frame however many a client sends, and hyper has no hook to stop it: one
//! connection flooding WINDOW_UPDATE(+1) keeps a core busy for as long as it likes. So the
//! proxy follows the frame headers on the downstream connection itself (`FrameCursor`, in
//! `io::ActivityIo`) and ends a connection whose frames that carry no request outrun its budget
//! (`ControlBudget`) with GOAWAY ENHANCE_YOUR_CALM, as nginx does.
//!
//! The budget is credit: a burst to start with, refilled over time, and earned by real work,
//! because legitimate clients send such frames in proportion to it (a WINDOW_UPDATE per DATA frame
//! received at worst, on the stream and on the connection; a PRIORITY or RST_STREAM per request).
//! Everything here is pure and tested with byte splits at every position; the clock is passed in.

use std::{ops::ControlFlow, time::Duration};

use tokio::time::Instant;

/// What the client sends first, before any frame (RFC 9113 section 3.4).
pub const CLIENT_PREFACE_LEN: usize = 24;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame's 9-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    /// Payload length.
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    /// Stream id (the reserved bit cleared).
    pub stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8; 9]) -> FrameHead {
        FrameHead {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// Follows one direction of an HTTP/2 connection, frame header by frame header, from bytes in
/// any split; payloads are skipped, never copied.
#[derive(Clone, Debug)]
pub struct FrameCursor {
    /// Bytes to pass over uninspected: the rest of the client preface or of a payload.
    skip: usize,
    head: [u8; 9],
    filled: usize,
}

impl FrameCursor {
    /// What the client sends: the preface, then frames.
    pub fn client() -> FrameCursor {
        FrameCursor { skip: CLIENT_PREFACE_LEN, head: [0; 9], filled: 0 }
    }

    /// What the server sends: frames only.
    pub fn server() -> FrameCursor {
        FrameCursor { skip: 0, head: [0; 9], filled: 0 }
    }

    /// Between frames: nothing of a header or payload is pending.
    pub fn at_boundary(&self) -> bool {
        self.skip == 0 && self.filled == 0
    }

    /// Follows `bytes`, calling `on_head` with each frame header completed in them; stops as
    /// soon as it breaks.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_head: impl FnMut(FrameHead) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.filled).min(bytes.len());
            self.head[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == 9 {
                self.filled = 0;
                let head = FrameHead::parse(&self.head);
                self.skip = head.len as usize;
                on_head(head)?;
            }
        }
        ControlFlow::Continue(())
    }
}

/// Credit for frames that carry no request, per connection.
#[derive(Debug)]
pub struct ControlBudget {
    credit: u32,
    /// When time last refilled the credit.
    refilled: Instant,
}

impl ControlBudget {
    /// What a connection starts with, and the most time refills: h2spec and browsers send a few
    /// SETTINGS, PRIORITY and WINDOW_UPDATE frames up front; a flood is ended after about this
    /// many frames.
    pub const BURST: u32 = 1_000;
    /// Refill per second: keepalive PINGs and the odd SETTINGS on an idle connection.
    pub const REFILL_PER_SEC: u32 = 100;
    /// The most credit earned by real work; high enough that a client acknowledging each of
    /// thousands of small DATA frames in flight (earned before their WINDOW_UPDATEs come) is
    /// never short, low enough that a long-lived connection cannot bank a flood.
    pub const MOST: u32 = 10_000;
    /// Earned per request (HEADERS): its PRIORITY, RST_STREAM and so on.
    const PER_REQUEST: u32 = 10;
    /// Earned per DATA frame sent: the WINDOW_UPDATE it may bring, on the stream and on the
    /// connection.
    const PER_DATA_SENT: u32 = 2;

    pub fn new(now: Instant) -> ControlBudget {
        ControlBudget { credit: Self::BURST, refilled: now }
    }

    /// A frame the client sent. `Break` when it carries no request and no credit is left;
    /// `now` is read only then.
    pub fn received(&mut self, head: FrameHead, now: impl FnOnce() -> Instant) -> ControlFlow<()> {
        match head.kind {
            HEADERS => self.earn(Self::PER_REQUEST),
            // Request body bytes, or its end; an empty DATA frame carries nothing.
            DATA if head.len > 0 || head.flags & END_STREAM != 0 => self.earn(1),
            // Part of a header block: h2 bounds those (CONTINUATION floods are its own).
            CONTINUATION => {}
            // WINDOW_UPDATE, PRIORITY, PING, SETTINGS, RST_STREAM, GOAWAY, PUSH_PROMISE, empty
            // DATA and unknown types (h2 ignores those, but reads each).
            _ => return self.spend(now),
        }
        ControlFlow::Continue(())
    }

    /// A frame the proxy sent: credit for the frames a client answers it with.
    pub fn sent(&mut self, head: FrameHead) {
        match head.kind {
            DATA if head.len > 0 => self.earn(Self::PER_DATA_SENT),
            // Acknowledged by the client.
            SETTINGS | PING if head.flags & ACK == 0 => self.earn(1),
            _ => {}
        }
    }

    fn earn(&mut self, n: u32) {
        self.credit = self.credit.saturating_add(n).min(Self::MOST);
    }

    fn spend(&mut self, now: impl FnOnce() -> Instant) -> ControlFlow<()> {
        if self.credit == 0 {
            // Refilled lazily, only once the credit ran out: no clock read per frame.
            let now = now();
            let elapsed = now.saturating_duration_since(self.refilled);
            let refill = elapsed.as_millis().saturating_mul(u128::from(Self::REFILL_PER_SEC)) / 1000;
            if refill == 0 {
                return ControlFlow::Break(());
            }
            self.credit = u32::try_from(refill).unwrap_or(u32::MAX).min(Self::BURST);
            self.refilled = now;
        }
        self.credit -= 1;
        ControlFlow::Continue(())
    }

    /// How long after running out a connection gets one more frame.
    pub const fn refill_period() -> Duration {
        Duration::from_millis(1000 / Self::REFILL_PER_SEC as u64)
    }
}

/// A GOAWAY frame: stream 0, `last_stream`, ENHANCE_YOUR_CALM, no debug data.
pub fn goaway_enhance_your_calm(last_stream: u32) -> [u8; 17] {
    let mut frame = [0u8; 17];
    frame[2] = 8; // payload length
    frame[3] = GOAWAY;
    frame[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    frame[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIORITY: u8 = 0x2;
    const WINDOW_UPDATE: u8 = 0x8;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream.to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    fn heads(cursor: &mut FrameCursor, parts: &[&[u8]]) -> Vec<FrameHead> {
        let mut seen = Vec::new();
        for part in parts {
            let _ = cursor.feed(part, |h| {
                seen.push(h);
                ControlFlow::Continue(())
            });
        }
        seen
    }

    #[test]
    fn frame_heads_are_found_whatever_the_split() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        bytes.extend(frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()));
        bytes.extend(frame(HEADERS, 0x5, 0x8000_0001, &[0x82; 20]));
        bytes.extend(frame(DATA, 0x1, 1, &[]));
        bytes.extend(frame(PING, 0, 0, &[7; 8]));
        let want = vec![
            FrameHead { len: 6, kind: SETTINGS, flags: 0, stream: 0 },
            FrameHead { len: 4, kind: WINDOW_UPDATE, flags: 0, stream: 0 },
            FrameHead { len: 20, kind: HEADERS, flags: 0x5, stream: 1 },
            FrameHead { len: 0, kind: DATA, flags: 0x1, stream: 1 },
            FrameHead { len: 8, kind: PING, flags: 0, stream: 0 },
        ];
        assert_eq!(heads(&mut FrameCursor::client(), &[&bytes]), want);
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut cursor = FrameCursor::client();
                let got = heads(&mut cursor, &[&bytes[..i], &bytes[i..j], &bytes[j..]]);
                assert_eq!(got, want, "split at {i} and {j}");
                assert!(cursor.at_boundary());
            }
        }
        let mut cursor = FrameCursor::client();
        let _ = heads(&mut cursor, &[&bytes[..bytes.len() - 1]]);
        assert!(!cursor.at_boundary(), "inside the PING's payload");
        let mut one_by_one = FrameCursor::client();
        let got: Vec<_> = bytes.chunks(1).flat_map(|b| heads(&mut one_by_one, &[b])).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_server_stream_has_no_preface_and_a_break_stops_the_feed() {
        let mut bytes = frame(DATA, 0, 1, b"abc");
        bytes.extend(frame(DATA, 0, 1, b"de"));
        let mut cursor = FrameCursor::server();
        let mut n = 0;
        let flow = cursor.feed(&bytes, |_| {
            n += 1;
            ControlFlow::Break(())
        });
        assert_eq!((flow, n), (ControlFlow::Break(()), 1));
    }

    fn head(kind: u8, flags: u8, len: u32) -> FrameHead {
        FrameHead { len, kind, flags, stream: 0 }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_frames_that_carry_no_request_runs_out_after_the_burst() {
        for kind in [WINDOW_UPDATE, PRIORITY, PING, SETTINGS, 0x3, 0xf0] {
            let mut budget = ControlBudget::new(Instant::now());
            let mut accepted = 0u32;
            while budget.received(head(kind, 0, 4), Instant::now).is_continue() {
                accepted += 1;
                assert!(accepted <= ControlBudget::BURST, "kind {kind:#x}");
            }
            assert_eq!(accepted, ControlBudget::BURST, "kind {kind:#x}");
        }
        // Empty DATA frames carry nothing either.
        let mut budget = ControlBudget::new(Instant::now());
        let accepted = (0..2 * ControlBudget::BURST)
            .take_while(|_| budget.received(head(DATA, 0, 0), Instant::now).is_continue())
            .count();
        assert_eq!(accepted, ControlBudget::BURST as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn time_refills_the_burst_at_the_refill_rate() {
        let mut budget = ControlBudget::new(Instant::now());
        for _ in 0..ControlBudget::BURST {
            assert!(budget.received(head(PING, 0, 8), Instant::now).is_continue());
        }
        assert!(budget.received(head(PING, 0, 8), Instant::now).is_break());
        tokio::time::advance(ControlBudget::refill_period()).await;
        assert!(budget.received(head(PING, 0, 8), Instant::now).is_continue());
        assert!(budget.received(head(PING, 0, 8), Instant::now).is_break());
        // An idle hour refills the burst, not more.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let accepted = (0..5 * ControlBudget::BURST)
            .take_while(|_| budget.received(head(PING, 0, 8), Instant::now).is_continue());
        assert_eq!(accepted.count(), ControlBudget::BURST as usize);
    }

    /// A download with a tiny window: the client acknowledges every DATA frame on the stream and
    /// on the connection, far more WINDOW_UPDATEs than the burst, and is never short.
    #[tokio::test(start_paused = true)]
    async fn real_work_earns_what_legitimate_clients_spend() {
        let mut budget = ControlBudget::new(Instant::now());
        let now = || -> Instant { panic!("the clock is read only when the credit runs out") };
        for _ in 0..100_000 {
            budget.sent(head(DATA, 0, 1024));
            assert!(budget.received(head(WINDOW_UPDATE, 0, 4), now).is_continue());
            assert!(budget.received(head(WINDOW_UPDATE, 0, 4), now).is_continue());
        }
        // Uploads and requests earn too; credit from work is capped.
        for _ in 0..100_000 {
            assert!(budget.received(head(DATA, 0, 16_384), now).is_continue());
            assert!(budget.received(head(HEADERS, 0x4, 30), now).is_continue());
            assert!(budget.received(head(CONTINUATION, 0x4, 30), now).is_continue());
        }
        let accepted = (0..5 * ControlBudget::MOST)
            .take_while(|_| budget.received(head(WINDOW_UPDATE, 0, 4), Instant::now).is_continue());
        assert_eq!(accepted.count(), ControlBudget::MOST as usize);
        // The proxy's SETTINGS and PINGs earn their acknowledgements, not their ACKs.
        budget.sent(head(SETTINGS, 0, 6));
        budget.sent(head(SETTINGS, ACK, 0));
        budget.sent(head(PING, ACK, 8));
        assert!(budget.received(head(SETTINGS, ACK, 0), Instant::now).is_continue());
        assert!(budget.received(head(SETTINGS, ACK, 0), Instant::now).is_break());
    }

    #[test]
    fn goaway_says_enhance_your_calm_and_the_last_stream() {
        let frame_bytes = goaway_enhance_your_calm(7);
        assert_eq!(frame_bytes.to_vec(), frame(GOAWAY, 0, 0, &[0, 0, 0, 7, 0, 0, 0, 0xb]));
    }
}
