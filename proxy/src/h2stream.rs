//! HTTP/2 streams of the mesh connection, driven with the `h2` crate
//! directly: a response body ([`RecvBody`]), a request body pumped into a
//! stream ([`send_body`]), and a stream as a byte pipe for tunnels
//! ([`StreamIo`]).
//!
//! The client's proxy sends every request from the task that reads the
//! application's connection. A generic HTTP client would hand each request
//! to the connection's task, spawn a task to await its response and pass
//! the answer back over a channel; on the hot path that is a task, two
//! channels and several wakeups per request for nothing.
//!
//! Flow control follows one rule everywhere: data is written only within
//! the capacity the peer granted, so a slow receiver holds its sender back
//! instead of growing a buffer, and received data is credited back to the
//! peer as soon as it is taken off the stream.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pool::Body;

/// Whether an error means the server refused the stream unseen, so that
/// the request can be sent again whatever its method (RFC 9113 §8.7): a
/// `REFUSED_STREAM` reset, or a `GOAWAY` whose last stream came before it
/// (a server closing a connection gracefully, as nginx does after 1000
/// requests and gRPC servers at their maximum connection age). A stream
/// the server had taken up and then lost ends in another error.
pub(crate) fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        cur = err.source();
    }
    false
}

/// A response body arriving on an HTTP/2 stream.
pub struct RecvBody {
    recv: RecvStream,
    /// Bytes still announced by `content-length`, for the size hint that
    /// lets an HTTP/1.1 server send the body without chunking.
    remaining: Option<u64>,
    data_done: bool,
}

impl RecvBody {
    pub fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        RecvBody {
            recv,
            remaining,
            data_done: false,
        }
    }
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Credit the peer at once: the bytes leave the stream's
                    // window now, and whoever reads this body applies its
                    // own backpressure by not polling.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut this.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Waits until the stream may carry at least one more byte, asking the
/// connection for `want` bytes of the peer's window. `None` when the
/// stream can no longer send.
fn poll_capacity(
    send: &mut SendStream<Bytes>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<Option<usize>> {
    send.reserve_capacity(want);
    loop {
        let now = send.capacity();
        if now > 0 {
            return Poll::Ready(Some(now));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => return Poll::Ready(Some(n)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Poll::Ready(None),
        }
    }
}

/// Sends `body` on `send` to its end, trailers included. Runs inline when
/// the body is already complete (the common case for a request that fits
/// a few reads); a body still streaming continues in a task of its own,
/// because the response may arrive, and be handed on, long before the
/// request body ends (gRPC streaming).
pub fn send_body(body: Body, send: SendStream<Bytes>, cx: &mut Context<'_>) {
    let mut pipe = BodyPipe::new(body, send);
    if Pin::new(&mut pipe).poll(cx).is_pending() {
        tokio::spawn(pipe);
    }
}

/// [`send_body`] from async code: the body starts in the caller's task.
pub async fn start_body(body: Body, send: SendStream<Bytes>) {
    let mut pipe = Some((body, send));
    std::future::poll_fn(|cx| {
        if let Some((body, send)) = pipe.take() {
            send_body(body, send, cx);
        }
        Poll::Ready(())
    })
    .await;
}

/// A body pumped into a stream within the peer's window; done when the
/// body has ended or the stream can take no more.
pub struct BodyPipe {
    body: Body,
    send: SendStream<Bytes>,
    /// Data read from the body, waiting for window to send it in.
    pending: Bytes,
}

impl BodyPipe {
    pub fn new(body: Body, send: SendStream<Bytes>) -> Self {
        BodyPipe {
            body,
            send,
            pending: Bytes::new(),
        }
    }
}

impl Future for BodyPipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The server may answer and reset the stream before the body
            // ends (a 413, say): then the rest is not wanted.
            if this.send.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if !this.pending.is_empty() {
                let Some(n) = ready!(poll_capacity(&mut this.send, this.pending.len(), cx)) else {
                    return Poll::Ready(());
                };
                let chunk = this.pending.split_to(n.min(this.pending.len()));
                // The last chunk carries the end of the stream itself.
                let end = this.pending.is_empty() && this.body.is_end_stream();
                if this.send.send_data(chunk, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            // As in an HTTP/1.1 trailer section: only the
                            // proxy that verified a peer says who it is.
                            crate::http::remove_client_id(&mut trailers);
                            let _ = this.send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    // The application's side broke off mid-body: the
                    // server must not take a truncated body as whole.
                    tracing::debug!(error = %e, "request body failed; resetting the stream");
                    this.send.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
            if this.body.is_end_stream() && this.pending.is_empty() {
                let _ = this.send.send_data(Bytes::new(), true);
                return Poll::Ready(());
            }
        }
    }
}

/// One HTTP/2 stream as a byte stream: what a `CONNECT` tunnel carries.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read.
    buf: Bytes,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        StreamIo {
            send,
            recv,
            buf: Bytes::new(),
        }
    }
}

/// A stream error as an I/O error. A peer that cancels, or finishes
/// without error, has closed the tunnel rather than broken it.
fn io_error(e: h2::Error) -> io::Error {
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) => {
            io::ErrorKind::BrokenPipe.into()
        }
        _ if e.is_io() => e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into()),
        _ => io::Error::new(io::ErrorKind::ConnectionReset, e),
    }
}

impl StreamIo {
    /// Waits for received bytes unless some are at hand; leaves `buf`
    /// empty at the end of the stream.
    fn poll_received(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // An empty DATA frame is not the end of the stream: reading nothing
        // would tell the caller it was.
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buf = data;
                }
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends the front of `len` bytes, as much as the peer's window takes:
    /// `take(n)` hands over those `n` bytes. How many went.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        take: impl FnOnce(usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        let Some(n) = ready!(poll_capacity(send, len, cx)) else {
            return Poll::Ready(Err(closed(send, cx)));
        };
        let n = n.min(len);
        match send.send_data(take(n), false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(closed(send, cx))),
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_received(cx))?;
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Hands over the received frames themselves.
impl crate::relay::ReadSide for StreamIo {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _: &mut BytesMut,
    ) -> Poll<io::Result<Bytes>> {
        ready!(self.poll_received(cx))?;
        Poll::Ready(Ok(std::mem::take(&mut self.buf)))
    }
}

/// Sends the chunks read as they are, as much of each as the peer's
/// window takes.
impl crate::relay::WriteSide for StreamIo {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, chunk.len(), |n| chunk.split_to(n))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // A copy of what the window takes; the relay hands over owned
        // chunks instead.
        self.poll_send(cx, buf.len(), |n| Bytes::copy_from_slice(&buf[..n]))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is already the connection's; its task flushes.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let send = &mut self.send;
        match send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(closed(send, cx))),
        }
    }
}

/// Why a stream can no longer send, as an I/O error.
fn closed(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) if reason != Reason::NO_ERROR && reason != Reason::CANCEL => {
            io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason))
        }
        Poll::Ready(Err(e)) => io_error(e),
        _ => io::ErrorKind::BrokenPipe.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_a_stream_the_server_never_took_is_refused() {
        assert!(refused(&h2::Error::from(Reason::REFUSED_STREAM)));
        #[derive(Debug, thiserror::Error)]
        #[error("the request failed")]
        struct Wrapped(#[source] h2::Error);
        let wrapped = Wrapped(h2::Error::from(Reason::REFUSED_STREAM));
        assert!(refused(&wrapped), "found in the error's sources");
        assert!(!refused(&h2::Error::from(Reason::INTERNAL_ERROR)));
        assert!(!refused(&h2::Error::from(Reason::CANCEL)));
        assert!(!refused(&io::Error::from(io::ErrorKind::BrokenPipe)));
    }

    /// A client and server over an in-memory pipe, both driven in tasks.
    async fn pair() -> (
        h2::client::SendRequest<Bytes>,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(h2::server::handshake(b));
        let (client, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        (client, server.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn a_streamed_body_with_trailers_arrives_whole_and_a_response_body_reads_back() {
        let (mut client, mut server) = pair().await;
        let big = Bytes::from(vec![7u8; 300 * 1024]);
        let expected = big.clone();
        let srv = tokio::spawn(async move {
            let (req, mut respond) = server.accept().await.unwrap().unwrap();
            // The connection only moves while it is polled.
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let mut body = req.into_body();
            let mut got = Vec::new();
            while let Some(d) = body.data().await {
                let d = d.unwrap();
                let _ = body.flow_control().release_capacity(d.len());
                got.extend_from_slice(&d);
            }
            let trailers = body.trailers().await.unwrap().unwrap();
            assert_eq!(trailers["x-sum"], "ok");
            assert_eq!(got.len(), expected.len());
            let res = http::Response::builder()
                .header("content-length", "5")
                .body(())
                .unwrap();
            let mut send = respond.send_response(res, false).unwrap();
            send.send_data(Bytes::from_static(b"hello"), true).unwrap();
        });
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body: Body = ChannelBody(rx).boxed();
        let req = http::Request::post("http://x/").body(()).unwrap();
        let (res, send) = client.send_request(req, false).unwrap();
        start_body(body, send).await;
        for chunk in big.chunks(64 * 1024) {
            tx.send(Frame::data(Bytes::copy_from_slice(chunk)))
                .await
                .unwrap();
        }
        let mut t = HeaderMap::new();
        t.insert("x-sum", "ok".parse().unwrap());
        tx.send(Frame::trailers(t)).await.unwrap();
        let res = res.await.unwrap();
        let (head, recv) = res.into_parts();
        let body = RecvBody::new(recv, &head.headers);
        assert_eq!(body.size_hint().exact(), Some(5));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        srv.await.unwrap();
        drop(client);
    }

    /// Body frames as a test sends them.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

    impl hyper::body::Body for ChannelBody {
        type Data = Bytes;
        type Error = crate::pool::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    #[tokio::test]
    async fn an_empty_data_frame_is_not_the_end_of_a_tunnel() {
        let (mut client, mut server) = pair().await;
        let srv = tokio::spawn(async move {
            let (_req, mut respond) = server.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from_static(b"one "), false).unwrap();
            send.send_data(Bytes::new(), false).unwrap();
            send.send_data(Bytes::from_static(b"two"), true).unwrap();
        });
        let req = http::Request::connect("10.200.0.1:80").body(()).unwrap();
        let (res, send) = client.send_request(req, false).unwrap();
        let res = res.await.unwrap();
        let mut io = StreamIo::new(send, res.into_body());
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"one two");
        srv.await.unwrap();
        drop(client);
    }

    #[tokio::test]
    async fn a_tunnel_stream_carries_bytes_both_ways_and_half_closes() {
        let (mut client, mut server) = pair().await;
        let srv = tokio::spawn(async move {
            let (req, mut respond) = server.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut io = StreamIo::new(send, req.into_body());
            let mut got = Vec::new();
            io.read_to_end(&mut got).await.unwrap();
            io.write_all(&got).await.unwrap();
            io.shutdown().await.unwrap();
        });
        let req = http::Request::connect("10.200.0.1:80").body(()).unwrap();
        let (res, send) = client.send_request(req, false).unwrap();
        let res = res.await.unwrap();
        let mut io = StreamIo::new(send, res.into_body());
        let data = vec![3u8; 1 << 20];
        io.write_all(&data).await.unwrap();
        io.shutdown().await.unwrap();
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
        srv.await.unwrap();
        drop(client);
    }
}
