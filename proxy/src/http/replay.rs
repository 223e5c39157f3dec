//! Request bodies kept so that a failed attempt can be tried again.
//!
//! A body of known length within the policy's retry buffer is read whole
//! before the first attempt. A body of unknown length (HTTP/1.1 chunked,
//! and nearly every HTTP/2 request, gRPC included) cannot be waited for:
//! a streaming call sends its next message only after a reply, so holding
//! the first attempt back until the end could stall it forever. Such a body
//! is sent as it arrives and a copy is kept beside it while it fits the
//! buffer; once it has ended within the bound it can be sent again. A body
//! that outgrows the buffer, fails, or has not ended when the answer comes
//! is not retried. One that an attempt gave back unread (the connection
//! failed before any of it was sent) is still whole and can go again.
//!
//! A body can also break on the application's side: malformed chunked
//! framing, or a client that goes away part-way through its upload. The
//! attempt then fails, but not because of the destination, so
//! [`RequestBody::client_failed`] lets the retry loop tell the two apart.
//! Likewise a timeout that passes while the body is still arriving may be
//! the uploader's slowness as much as the server's:
//! [`RequestBody::still_arriving`] says so.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

use super::{empty, full};
use crate::pool::{Body, BoxError};

/// A request body as the retry loop holds it between attempts. `B` is
/// the application's body (hyper's, outside tests).
pub(super) enum RequestBody<B = Incoming> {
    /// Read whole before the first attempt; `None` when empty.
    Whole(Option<Bytes>),
    /// Sent as it arrives, with a copy kept while it fits.
    Teed(Arc<Mutex<Copy<B>>>),
    /// Sent once, as it arrives, watched as it goes.
    Streaming(Option<Body>, Arc<Watch>),
}

impl RequestBody {
    /// Prepares `body` for its first attempt. `limit` is the retry buffer;
    /// `may_retry` whether the policy and the method allow a second try at
    /// all (without it nothing is kept). Fails when a body read whole
    /// breaks off or outgrows its stated length.
    pub(super) async fn read(
        body: Incoming,
        headers: &HeaderMap,
        limit: usize,
        may_retry: bool,
    ) -> Result<Self, ()> {
        if body.is_end_stream() {
            return Ok(RequestBody::Whole(None));
        }
        if !may_retry || limit == 0 {
            return Ok(RequestBody::streaming(body));
        }
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        match length {
            Some(n) if n <= limit => {
                let collected = http_body_util::Limited::new(body, limit)
                    .collect()
                    .await
                    .map_err(drop)?;
                Ok(RequestBody::Whole(Some(collected.to_bytes())))
            }
            Some(_) => Ok(RequestBody::streaming(body)),
            None => Ok(RequestBody::teed(body, limit)),
        }
    }
}

impl<B> RequestBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    fn teed(body: B, limit: usize) -> Self {
        RequestBody::Teed(Arc::new(Mutex::new(Copy {
            state: State::Unread(body),
            limit,
            watch: Watch::default(),
        })))
    }

    fn streaming(body: B) -> Self {
        let watch = Arc::new(Watch::default());
        let watched = Watched {
            body,
            watch: watch.clone(),
        };
        RequestBody::Streaming(Some(watched.map_err(Into::into).boxed()), watch)
    }

    /// Whether the application's body failed while an attempt read it: a
    /// failed attempt is then the client's doing, not the destination's.
    pub(super) fn client_failed(&self) -> bool {
        self.watched(Watch::failed)
    }

    /// Whether an attempt had begun to read the application's body, and
    /// the body had neither ended nor failed: the proxy may have been
    /// waiting on the client, not on the destination. A body read whole
    /// before the first attempt never is.
    pub(super) fn still_arriving(&self) -> bool {
        self.watched(Watch::arriving)
    }

    fn watched(&self, ask: fn(&Watch) -> bool) -> bool {
        match self {
            RequestBody::Whole(_) => false,
            RequestBody::Teed(copy) => ask(&lock(copy).watch),
            RequestBody::Streaming(_, watch) => ask(watch),
        }
    }

    /// The body for the next attempt. After the first, only valid while
    /// [`RequestBody::is_replayable`] holds; otherwise the body fails, so
    /// the attempt is reset rather than sent short.
    pub(super) fn attempt(&mut self) -> Body {
        match self {
            RequestBody::Whole(None) => empty(),
            RequestBody::Whole(Some(b)) => full(b.clone()),
            RequestBody::Streaming(b, _) => b.take().unwrap_or_else(|| Replay::Gone.boxed()),
            RequestBody::Teed(copy) => {
                let mut c = lock(copy);
                match std::mem::replace(&mut c.state, State::Broken) {
                    State::Unread(body) => {
                        c.state = State::Filling(BytesMut::new());
                        drop(c);
                        Tee {
                            body: Some(body),
                            copy: copy.clone(),
                            read: false,
                        }
                        .map_err(Into::into)
                        .boxed()
                    }
                    State::Ended(data, trailers) => {
                        let replay = Replay::Copy(Some(data.clone()), trailers.clone());
                        c.state = State::Ended(data, trailers);
                        replay.boxed()
                    }
                    other => {
                        c.state = other;
                        Replay::Gone.boxed()
                    }
                }
            }
        }
    }

    /// Whether the body can be sent again now: it was read whole, or its
    /// copy is complete, or the last attempt gave it back unread.
    pub(super) fn is_replayable(&self) -> bool {
        match self {
            RequestBody::Whole(_) => true,
            RequestBody::Teed(copy) => {
                matches!(lock(copy).state, State::Unread(_) | State::Ended(..))
            }
            RequestBody::Streaming(..) => false,
        }
    }
}

fn lock<B>(copy: &Mutex<Copy<B>>) -> std::sync::MutexGuard<'_, Copy<B>> {
    copy.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The copy of a teed body, shared by the retry loop and the attempt
/// that is sending it.
pub(super) struct Copy<B> {
    state: State<B>,
    limit: usize,
    watch: Watch,
}

enum State<B> {
    /// No attempt has read from the body yet.
    Unread(B),
    /// Being sent; what was sent so far.
    Filling(BytesMut),
    /// Sent to its end within the bound.
    Ended(Bytes, Option<HeaderMap>),
    /// Outgrew the bound, failed, or was dropped part-way: never again.
    Broken,
}

impl<B> Copy<B> {
    fn keep(&mut self, frame: &Frame<Bytes>) {
        let State::Filling(data) = &mut self.state else {
            return;
        };
        if let Some(chunk) = frame.data_ref() {
            if data.len() + chunk.len() > self.limit {
                self.state = State::Broken;
            } else {
                data.extend_from_slice(chunk);
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            let data = std::mem::take(data).freeze();
            self.state = State::Ended(data, Some(trailers.clone()));
        }
    }

    fn end(&mut self) {
        if let State::Filling(data) = &mut self.state {
            let data = std::mem::take(data).freeze();
            self.state = State::Ended(data, None);
        }
    }
}

/// The application's body on its way to an attempt, copying what passes.
struct Tee<B> {
    body: Option<B>,
    copy: Arc<Mutex<Copy<B>>>,
    /// Whether any frame (or error) was taken from `body`.
    read: bool,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Tee<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = ready!(Pin::new(&mut *body).poll_frame(cx));
        let mut copy = lock(&this.copy);
        copy.watch.note(&polled, body.is_end_stream());
        match &polled {
            Some(Ok(frame)) => {
                this.read = true;
                copy.keep(frame);
                // Whoever sends the body may stop at the last frame
                // without asking for the end.
                if body.is_end_stream() {
                    copy.end();
                }
            }
            Some(Err(_)) => {
                this.read = true;
                copy.state = State::Broken;
            }
            None => copy.end(),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        let mut copy = lock(&self.copy);
        match self.body.take() {
            // Nothing was taken from it: the body is whole for the next try.
            Some(body) if !self.read => copy.state = State::Unread(body),
            // Dropped part-way: the rest of the body is lost with it.
            _ => {
                if matches!(copy.state, State::Filling(_)) {
                    copy.state = State::Broken;
                }
            }
        }
    }
}

/// What the retry loop learns of the application's body after an
/// attempt: whether any of it was read, and whether it ended or failed.
#[derive(Debug, Default)]
pub(super) struct Watch(AtomicU8);

impl Watch {
    const STARTED: u8 = 1;
    const ENDED: u8 = 2;
    const FAILED: u8 = 4;

    /// Takes note of one poll of the body that was ready; `at_end` is the
    /// body's `is_end_stream` after it, since whoever sends the body may
    /// stop at the last frame without asking for the end.
    fn note<E>(&self, polled: &Option<Result<Frame<Bytes>, E>>, at_end: bool) {
        let seen = match polled {
            Some(Ok(_)) if at_end => Self::STARTED | Self::ENDED,
            Some(Ok(_)) => Self::STARTED,
            Some(Err(_)) => Self::STARTED | Self::FAILED,
            None => Self::STARTED | Self::ENDED,
        };
        self.0.fetch_or(seen, Ordering::Relaxed);
    }

    fn failed(&self) -> bool {
        self.0.load(Ordering::Relaxed) & Self::FAILED != 0
    }

    fn arriving(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::STARTED
    }
}

/// The application's body sent once, watched as it goes.
struct Watched<B> {
    body: B,
    watch: Arc<Watch>,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Watched<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = ready!(Pin::new(&mut this.body).poll_frame(cx));
        this.watch.note(&polled, this.body.is_end_stream());
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A kept body sent again, or one that is gone.
enum Replay {
    Copy(Option<Bytes>, Option<HeaderMap>),
    Gone,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        Poll::Ready(match this {
            Replay::Copy(data, trailers) => match data.take() {
                Some(d) if !d.is_empty() => Some(Ok(Frame::data(d))),
                _ => trailers.take().map(|t| Ok(Frame::trailers(t))),
            },
            Replay::Gone => Some(Err("the request body was already sent and not kept".into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Replay::Copy(data, trailers) => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            Replay::Gone => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            // Trailers need chunked framing on HTTP/1.1: no exact length.
            Replay::Copy(data, None) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Replay::Copy(_, Some(_)) => SizeHint::default(),
            Replay::Gone => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use super::*;

    /// A body that hands out its frames one poll at a time.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Frames {
        fn data(chunks: &[&'static [u8]]) -> Self {
            Frames(
                chunks
                    .iter()
                    .map(|c| Frame::data(Bytes::from_static(c)))
                    .collect(),
            )
        }

        fn with_trailers(mut self, name: &'static str, value: &'static str) -> Self {
            let mut t = HeaderMap::new();
            t.insert(name, http::HeaderValue::from_static(value));
            self.0.push_back(Frame::trailers(t));
            self
        }
    }

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// Everything `body` yields: its data, then its trailers.
    async fn drain(body: Body) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes().to_vec(), trailers))
    }

    /// Reads `n` frames of `body`, then drops it.
    async fn read_some(mut body: Body, n: usize) {
        for _ in 0..n {
            body.frame().await.expect("a frame").expect("no error");
        }
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_that_fits_is_sent_and_can_be_sent_again() {
        let mut body = RequestBody::teed(
            Frames::data(&[b"hello ", b"world"]).with_trailers("x-sum", "1"),
            64,
        );
        assert!(body.is_replayable(), "unread: whole for the first try");
        let (data, trailers) = drain(body.attempt()).await.unwrap();
        assert_eq!(data, b"hello world");
        assert!(trailers.is_some());
        assert!(body.is_replayable());
        for _ in 0..2 {
            let (data, trailers) = drain(body.attempt()).await.unwrap();
            assert_eq!(data, b"hello world");
            assert_eq!(trailers.unwrap()["x-sum"], "1");
        }
    }

    #[tokio::test]
    async fn the_end_counts_when_the_sender_stops_at_the_last_frame() {
        let mut body = RequestBody::teed(Frames::data(&[b"one", b"two"]), 64);
        // A sender that trusts `is_end_stream` never polls past the data.
        read_some(body.attempt(), 2).await;
        assert!(body.is_replayable());
        assert_eq!(drain(body.attempt()).await.unwrap().0, b"onetwo");
    }

    #[tokio::test]
    async fn a_body_that_outgrows_the_buffer_is_sent_whole_once() {
        let mut body = RequestBody::teed(Frames::data(&[b"0123456789", b"abcdefghij"]), 15);
        assert_eq!(
            drain(body.attempt()).await.unwrap().0,
            b"0123456789abcdefghij"
        );
        assert!(!body.is_replayable());
        assert!(drain(body.attempt()).await.is_err(), "never sent short");
    }

    #[tokio::test]
    async fn an_attempt_that_read_nothing_gives_the_body_back() {
        let mut body = RequestBody::teed(Frames::data(&[b"abc", b"def"]), 64);
        drop(body.attempt());
        assert!(body.is_replayable());
        assert_eq!(drain(body.attempt()).await.unwrap().0, b"abcdef");
    }

    /// A body that yields one chunk and then breaks, as hyper's does on a
    /// malformed chunk or a client gone part-way.
    struct Breaking(bool);

    impl hyper::body::Body for Breaking {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            let sent = std::mem::replace(&mut self.get_mut().0, true);
            Poll::Ready(Some(if sent {
                Err("invalid chunk size".into())
            } else {
                Ok(Frame::data(Bytes::from_static(b"part")))
            }))
        }
    }

    #[tokio::test]
    async fn a_body_that_breaks_on_the_clients_side_is_told_apart() {
        for mut body in [
            RequestBody::teed(Breaking(false), 64),
            RequestBody::streaming(Breaking(false)),
        ] {
            assert!(!body.client_failed());
            assert!(drain(body.attempt()).await.is_err());
            assert!(body.client_failed());
            assert!(!body.is_replayable());
        }
        for mut body in [
            RequestBody::teed(Frames::data(&[b"abc"]), 64),
            RequestBody::streaming(Frames::data(&[b"abc"])),
        ] {
            drain(body.attempt()).await.unwrap();
            assert!(!body.client_failed(), "a body that ended is not a fault");
        }
        let mut gone = RequestBody::streaming(Frames::data(&[b"abc"]));
        drain(gone.attempt()).await.unwrap();
        assert!(drain(gone.attempt()).await.is_err());
        assert!(
            !gone.client_failed(),
            "a body already sent is the proxy's matter, not the client's"
        );
    }

    #[tokio::test]
    async fn a_body_still_arriving_is_told_from_one_that_ended_failed_or_was_never_read() {
        let three = || Frames::data(&[b"abc", b"def", b"ghi"]);
        for mut body in [
            RequestBody::teed(three(), 64),
            RequestBody::teed(three(), 4),
            RequestBody::streaming(three()),
        ] {
            assert!(!body.still_arriving(), "nothing read yet");
            read_some(body.attempt(), 1).await;
            assert!(body.still_arriving(), "dropped part-way");
            assert!(!body.client_failed());
        }
        for mut body in [
            RequestBody::teed(three(), 64),
            RequestBody::teed(three(), 4),
            RequestBody::streaming(three()),
        ] {
            read_some(body.attempt(), 3).await;
            assert!(!body.still_arriving(), "the last frame ends it");
        }
        for mut body in [
            RequestBody::teed(Breaking(false), 64),
            RequestBody::streaming(Breaking(false)),
        ] {
            assert!(drain(body.attempt()).await.is_err());
            assert!(!body.still_arriving(), "failed, not arriving");
        }
        let mut unread = RequestBody::teed(three(), 64);
        drop(unread.attempt());
        assert!(!unread.still_arriving(), "given back unread");
        let mut whole = RequestBody::<Frames>::Whole(Some(Bytes::from_static(b"abc")));
        read_some(whole.attempt(), 1).await;
        assert!(!whole.still_arriving(), "read before the attempt");
    }

    #[tokio::test]
    async fn an_attempt_dropped_part_way_leaves_nothing_to_send_again() {
        let mut body = RequestBody::teed(Frames::data(&[b"abc", b"def", b"ghi"]), 64);
        read_some(body.attempt(), 1).await;
        assert!(!body.is_replayable());
        assert!(drain(body.attempt()).await.is_err());
    }
}
