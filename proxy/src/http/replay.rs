//! A request body that can be sent again: the first try streams it through as it arrives while
//! keeping a copy of up to [`MAX_REPLAY`] bytes, and a retry replays the copy, then continues with
//! whatever the earlier try had not read (a connect failure reads nothing). A body larger than the
//! cap is never replayed, so retries cost at most 64 KiB per request (Linkerd's limit too).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};

use super::{Body, BoxError};

/// The most a request body may hold and still be retried.
pub const MAX_REPLAY: usize = 64 * 1024;

#[derive(Debug, Default)]
struct State {
    /// Data read so far, while within the cap.
    data: Vec<Bytes>,
    bytes: usize,
    trailers: Option<HeaderMap>,
    /// The rest of the original body, while no try is reading it.
    rest: Option<Body>,
    /// The original body ended: `data` (and `trailers`) are all of it.
    ended: bool,
    /// More than the cap went through: no replay.
    overflow: bool,
}

/// The handle later tries replay from; never read itself.
#[derive(Debug)]
pub struct Replay {
    state: Arc<Mutex<State>>,
}

/// One try's view of a replayable body.
#[derive(Debug)]
pub struct ReplayBody {
    state: Arc<Mutex<State>>,
    /// How many of `State::data` this try has sent.
    pos: usize,
    trailers_sent: bool,
    /// The original body while this try reads it; handed back on drop.
    rest: Option<Body>,
}

impl Replay {
    /// Wraps `body`: returns the handle and the first try's body.
    pub fn new(body: Body) -> (Replay, ReplayBody) {
        let ended = body.is_end_stream();
        let state = State { rest: (!ended).then_some(body), ended, ..State::default() };
        let handle = Replay { state: Arc::new(Mutex::new(state)) };
        let first = handle.view();
        (handle, first)
    }

    fn view(&self) -> ReplayBody {
        ReplayBody { state: self.state.clone(), pos: 0, trailers_sent: false, rest: None }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A body for another try, if the body can be replayed: within the cap, and either complete
    /// or not being read by a try that is still going.
    pub fn try_replay(&self) -> Option<ReplayBody> {
        let state = self.lock();
        let free = state.ended || state.rest.is_some();
        (!state.overflow && free).then(|| self.view())
    }

    /// The whole body, when it has been read completely and fits the cap (for mirroring).
    pub fn complete(&self) -> Option<Bytes> {
        let state = self.lock();
        (state.ended && !state.overflow && state.trailers.is_none()).then(|| match state.data.len() {
            0 => Bytes::new(),
            1 => state.data[0].clone(),
            _ => state.data.concat().into(),
        })
    }
}

impl ReplayBody {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(rest) = self.rest.take() {
            self.lock().rest = Some(rest);
        }
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut state = this.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(chunk) = state.data.get(this.pos) {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if state.ended {
            if !this.trailers_sent
                && let Some(t) = &state.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        if this.rest.is_none() {
            this.rest = state.rest.take();
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(Some(Err("request body is held by an earlier try".into())));
        };
        // Polled with the lock held: nothing else touches the state while a try reads.
        let polled = Pin::new(&mut *rest).poll_frame(cx);
        // A body of known length ends with its last byte; nobody may poll it again.
        let at_end = matches!(polled, Poll::Ready(Some(Ok(_)))) && rest.is_end_stream();
        if at_end {
            state.ended = true;
            this.rest = None;
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    state.bytes += data.len();
                    if state.bytes > MAX_REPLAY {
                        state.overflow = true;
                        state.data = Vec::new();
                    } else if !state.overflow {
                        state.data.push(data.clone());
                    }
                    this.pos = state.data.len();
                } else if let Some(t) = frame.trailers_ref() {
                    state.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                state.ended = true;
                this.rest = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.lock();
        state.ended && self.pos >= state.data.len() && (self.trailers_sent || state.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let state = self.lock();
        let buffered: usize = state.data.iter().skip(self.pos).map(Bytes::len).sum();
        if state.ended {
            return SizeHint::with_exact(buffered as u64);
        }
        let rest = self.rest.as_ref().or(state.rest.as_ref()).map(|r| r.size_hint()).unwrap_or_default();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered as u64);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + buffered as u64);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    /// A body that arrives in these chunks.
    fn chunks(parts: Vec<Bytes>) -> Body {
        let frames = parts.into_iter().map(|p| Ok::<_, BoxError>(Frame::data(p)));
        super::super::boxed(StreamBody::new(tokio_stream::iter(frames.collect::<Vec<_>>())))
    }

    fn text(parts: &[&'static str]) -> Body {
        chunks(parts.iter().map(|p| Bytes::from_static(p.as_bytes())).collect())
    }

    #[tokio::test]
    async fn a_retry_replays_what_the_first_try_read() {
        let (handle, first) = Replay::new(text(&["ab", "cd"]));
        drop(handle.try_replay().expect("unread: replayable"));
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcd");
        let replay = handle.try_replay().expect("complete and small: replayable");
        assert_eq!(handle.complete().unwrap(), "abcd");
        assert_eq!(replay.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_try_that_read_part_hands_the_rest_to_the_next() {
        let (handle, mut first) = Replay::new(text(&["ab", "cd", "ef"]));
        assert_eq!(first.frame().await.unwrap().unwrap().into_data().unwrap(), "ab");
        assert!(handle.try_replay().is_none(), "the first try still holds the body");
        drop(first); // its connection failed: the rest goes back
        let second = handle.try_replay().expect("free again");
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_not_replayed() {
        let (handle, first) =
            Replay::new(chunks(vec![Bytes::from(vec![b'x'; MAX_REPLAY]), Bytes::from_static(b"!")]));
        assert_eq!(first.collect().await.unwrap().to_bytes().len(), MAX_REPLAY + 1);
        assert!(handle.try_replay().is_none());
        assert!(handle.complete().is_none());
    }
}
