//! Opaque bidirectional copy between two streams.
//!
//! Bytes flow both ways at once with backpressure (a slow reader slows its
//! writer, nothing queues without bound), and a half-close is carried
//! across: when one side shuts down its writes the other side's write half
//! is shut down too, and data still flows the other way until that side
//! finishes. A connection with no bytes in either direction for the idle
//! timeout is closed.
//!
//! Bytes move as owned chunks ([`Bytes`]) from one side's
//! [`ReadSide::poll_read_chunk`] to the other's
//! [`WriteSide::poll_write_chunk`]. A socket reads into the relay's
//! buffer and writes from a slice; an HTTP/2 stream (a tunnel through the
//! mesh) hands over the frames it received and takes the chunks read as
//! they are, so a tunnel's bytes are not copied between the socket and the
//! stream on either proxy.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// Room for a read: four full TLS records, so that bulk transfers make a
/// quarter of the calls they would with one record. Smaller reads share
/// one buffer until less than half of it is left.
const BUF_SIZE: usize = 64 * 1024;

/// Reads shorter than this are copied out of the read buffer rather than
/// cut from it: copying them costs less than a buffer per message.
const COPY_BELOW: usize = 4 * 1024;

/// Bytes one direction moves in one go before it yields.
const YIELD_AFTER: u64 = 128 * 1024;

/// Bytes moved by a finished relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the side that opened the connection to the other.
    pub sent: u64,
    /// Back to the side that opened the connection.
    pub received: u64,
}

/// Why a relay ended early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no bytes in either direction for {0:?}; closed as idle")]
    Idle(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

thread_local! {
    /// A read buffer the relays of this thread gave back. A direction
    /// that has nothing to read parks its buffer here, and the next one
    /// to read takes it: small exchanges (a request, a ping) then neither
    /// allocate nor free 64 KiB each, and idle connections still hold no
    /// buffer.
    static SPARE: std::cell::Cell<Option<BytesMut>> = const { std::cell::Cell::new(None) };
}

/// An empty read buffer of [`BUF_SIZE`]: this thread's spare, or a new one.
fn spare_room() -> BytesMut {
    SPARE
        .take()
        .unwrap_or_else(|| BytesMut::with_capacity(BUF_SIZE))
}

/// Parks `room` as this thread's spare when nothing read into it is still
/// in use; otherwise it is freed with the last chunk cut from it.
fn park_room(mut room: BytesMut) {
    if room.is_empty() && room.try_reclaim(BUF_SIZE) {
        SPARE.set(Some(room));
    }
}

/// The reading end of a side of a relay.
pub trait ReadSide: AsyncRead + Unpin {
    /// The next bytes read, empty at the end of the stream. The default
    /// reads into `room`, which the relay keeps between reads and drops
    /// when there is nothing to read.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut BytesMut,
    ) -> Poll<io::Result<Bytes>> {
        // The old buffer is taken back once every chunk cut from it has
        // been written and dropped; while one is still queued (in an
        // HTTP/2 stream, say) another buffer is taken.
        if room.capacity() < BUF_SIZE / 2 && !room.try_reclaim(BUF_SIZE) {
            *room = spare_room();
        }
        ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *self),
            cx,
            room
        ))?;
        if room.len() < COPY_BELOW {
            // Copied out, the buffer stays free for the next read and can
            // be parked when the connection goes quiet; cut from it, a
            // small message queued for another task would keep 64 KiB
            // from being used again.
            let chunk = Bytes::copy_from_slice(room);
            room.clear();
            return Poll::Ready(Ok(chunk));
        }
        Poll::Ready(Ok(room.split().freeze()))
    }
}

/// The writing end of a side of a relay.
pub trait WriteSide: AsyncWrite + Unpin {
    /// Writes from the front of `chunk` and advances it past what was
    /// taken; how much that was.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        chunk.advance(n);
        Poll::Ready(Ok(n))
    }
}

// Sockets and the streams wrapping them read into the relay's buffer and
// write from a slice: the defaults.
impl ReadSide for tokio::net::TcpStream {}
impl WriteSide for tokio::net::TcpStream {}
#[cfg(test)]
impl ReadSide for tokio::io::DuplexStream {}
#[cfg(test)]
impl WriteSide for tokio::io::DuplexStream {}
impl<T: AsyncRead + Unpin> ReadSide for crate::telemetry::conn::Metered<T> {}
impl<T: AsyncWrite + Unpin> WriteSide for crate::telemetry::conn::Metered<T> {}
impl<T: hyper::rt::Read + hyper::rt::Write + Unpin> ReadSide for hyper_util::rt::TokioIo<T> {}
impl<T: hyper::rt::Read + hyper::rt::Write + Unpin> WriteSide for hyper_util::rt::TokioIo<T> {}

/// Copies both ways until both sides finish, a side fails, or the
/// connection idles for `idle`.
pub async fn relay<A, B>(
    mut client: A,
    mut server: B,
    idle: Duration,
) -> Result<Transferred, RelayError>
where
    A: ReadSide + WriteSide,
    B: ReadSide + WriteSide,
{
    let start = Instant::now();
    // Milliseconds from `start` to the latest read that brought bytes,
    // noted once per wakeup rather than on every read.
    let activity = AtomicU64::new(0);
    let mut read_seen = 0;
    let mut up = Pipe::default();
    let mut down = Pipe::default();
    let copy = std::future::poll_fn(|cx| {
        let sent = up.poll_copy(cx, &mut client, &mut server)?;
        let received = down.poll_copy(cx, &mut server, &mut client)?;
        if up.read + down.read != read_seen {
            read_seen = up.read + down.read;
            activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        match (sent, received) {
            (Poll::Ready(sent), Poll::Ready(received)) => {
                Poll::Ready(Ok::<_, io::Error>(Transferred { sent, received }))
            }
            _ => Poll::Pending,
        }
    });
    tokio::pin!(copy);
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = start + last + idle;
        tokio::select! {
            res = &mut copy => return Ok(res?),
            _ = tokio::time::sleep_until(deadline) => {
                let seen = Duration::from_millis(activity.load(Ordering::Relaxed));
                if seen == last {
                    return Err(RelayError::Idle(idle));
                }
            }
        }
    }
}

/// One direction of a relay.
///
/// Each chunk read is written on at once; what the writer cannot take yet
/// stays in `held`. The read buffer is dropped whenever the reader has
/// nothing more, so an idle connection holds no buffer at all: a thousand
/// open connections cost their sockets and tasks, not a buffer for each
/// direction waiting for data that may never come.
#[derive(Default)]
struct Pipe {
    /// Read and not yet written.
    held: Bytes,
    /// Room for the next reads.
    room: BytesMut,
    eof: bool,
    /// Set once the writer has been shut down: this direction is over.
    done: bool,
    unflushed: bool,
    /// Bytes read, and bytes written on.
    read: u64,
    moved: u64,
}

impl Pipe {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: ReadSide,
        W: WriteSide,
    {
        if self.done {
            return Poll::Ready(Ok(self.moved));
        }
        let start = self.moved;
        loop {
            while !self.held.is_empty() {
                // Pending keeps the rest; the writer wakes us when it has room.
                let n = ready!(writer.poll_write_chunk(cx, &mut self.held))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.moved += n as u64;
                self.unflushed = true;
            }
            // Written: let go of the read buffer it points into.
            self.held = Bytes::new();
            // Hand the thread back after a burst, once everything read has
            // been written: a writer that queues for another task (an
            // HTTP/2 stream, sent by its connection's task) must let that
            // task run, or the data leaves in one late burst while the
            // pipeline behind it idles.
            if self.moved - start >= YIELD_AFTER {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
            match reader.poll_read_chunk(cx, &mut self.room) {
                Poll::Ready(Ok(chunk)) if chunk.is_empty() => {
                    // Nothing more will be read this way. Kept until the
                    // relay ended, the buffer that read the end stayed
                    // with every connection closing at once, and their
                    // sum with the heap after they had gone.
                    park_room(std::mem::take(&mut self.room));
                    self.eof = true;
                }
                Poll::Ready(Ok(chunk)) => {
                    self.read += chunk.len() as u64;
                    self.held = chunk;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read and nothing held: give the buffer back
                    // and push out whatever the writer still holds.
                    park_room(std::mem::take(&mut self.room));
                    if self.unflushed {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

    #[tokio::test]
    async fn half_close_reaches_the_server_and_it_can_still_answer() {
        let (client_app, client_proxy) = tokio::io::duplex(64);
        let (server_proxy, server_app) = tokio::io::duplex(64);
        let relay = tokio::spawn(relay(client_proxy, server_proxy, Duration::from_secs(5)));

        let (mut cr, mut cw) = tokio::io::split(client_app);
        let (mut sr, mut sw) = tokio::io::split(server_app);
        cw.write_all(b"question").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"question", "server saw EOF after the data");
        sw.write_all(b"answer after half-close").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"answer after half-close");
        let t = relay.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                sent: 8,
                received: 23
            }
        );
    }

    /// A writer slower than the reader: most bytes go through the held
    /// buffer, and they arrive complete and in order.
    #[tokio::test]
    async fn a_slow_writer_gets_every_byte_in_order() {
        let (mut client_app, client_proxy) = tokio::io::duplex(100_000);
        let (server_proxy, mut server_app) = tokio::io::duplex(100);
        let relay = tokio::spawn(relay(client_proxy, server_proxy, Duration::from_secs(5)));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&sent).await.unwrap();
            client_app.shutdown().await.unwrap();
            client_app
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 37];
        loop {
            let n = server_app.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == data, "bytes lost or reordered");
        drop(server_app);
        drop(writer.await.unwrap());
        assert_eq!(relay.await.unwrap().unwrap().sent, 1_000_000);
    }

    /// Once the writer has caught up and the reader has nothing, a
    /// direction holds no buffer.
    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (mut app, mut reader) = tokio::io::duplex(1 << 20);
        let (mut writer, mut far) = tokio::io::duplex(10);
        let mut pipe = Pipe::default();
        app.write_all(&[1u8; 5000]).await.unwrap();
        let poll = std::future::poll_fn(|cx| {
            let _ = pipe.poll_copy(cx, &mut reader, &mut writer);
            Poll::Ready(())
        });
        poll.await;
        assert!(!pipe.held.is_empty(), "the writer was full: bytes are held");
        let mut got = vec![0u8; 5000];
        let drain = async {
            far.read_exact(&mut got).await.unwrap();
        };
        let copy = std::future::poll_fn(|cx| match pipe.poll_copy(cx, &mut reader, &mut writer) {
            Poll::Ready(r) => Poll::Ready(r.map(|_| ())),
            Poll::Pending if pipe.moved == 5000 => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        });
        let (_, copied) = tokio::join!(drain, copy);
        copied.unwrap();
        assert_eq!(got, vec![1u8; 5000]);
        assert_eq!(pipe.room.capacity(), 0, "an idle direction kept its buffer");
        assert!(pipe.held.is_empty());
    }

    /// A direction that read the end of its stream gives its buffer back
    /// at once, so that connections closing together reuse one buffer a
    /// thread instead of each holding its own until the other direction
    /// ends too.
    #[tokio::test]
    async fn a_direction_at_its_end_holds_no_buffer() {
        let (mut app, mut reader) = tokio::io::duplex(1 << 20);
        // The far side never reads: the shutdown that follows the end is
        // still pending when the poll returns.
        let (mut writer, _far) = tokio::io::duplex(10);
        app.write_all(b"last words").await.unwrap();
        app.shutdown().await.unwrap();
        SPARE.take();
        let mut pipe = Pipe::default();
        let moved =
            std::future::poll_fn(|cx| Poll::Ready(pipe.poll_copy(cx, &mut reader, &mut writer)))
                .await;
        assert!(pipe.eof, "the end was read ({moved:?})");
        assert_eq!(pipe.room.capacity(), 0, "the direction kept its buffer");
        assert!(SPARE.take().is_some(), "the buffer is the thread's spare");
    }

    /// Always has bytes until `left` runs out, and never makes its caller
    /// wait: the runtime's own fairness never steps in.
    struct Endless {
        left: usize,
    }

    impl AsyncRead for Endless {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = buf.remaining().min(self.left);
            buf.put_slice(&vec![0u8; n]);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    impl ReadSide for Endless {}

    /// Takes every write at once.
    struct Sink;

    impl WriteSide for Sink {}

    impl AsyncWrite for Sink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_long_burst_hands_the_thread_back_while_it_runs() {
        let mut pipe = Pipe::default();
        let mut reader = Endless { left: 16 << 20 };
        let mut writer = Sink;
        let mut polls = 0;
        let moved = std::future::poll_fn(|cx| {
            polls += 1;
            pipe.poll_copy(cx, &mut reader, &mut writer)
        })
        .await
        .unwrap();
        assert_eq!(moved, 16 << 20);
        assert!(
            polls >= (16 << 20) / YIELD_AFTER as usize,
            "16 MiB moved in {polls} polls: the relay kept the thread"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_but_busy_ones_are_not() {
        let (mut client_app, client_proxy) = tokio::io::duplex(64);
        let (server_proxy, mut server_app) = tokio::io::duplex(64);
        let relay = tokio::spawn(relay(client_proxy, server_proxy, Duration::from_secs(10)));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client_app.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server_app.read_exact(&mut b).await.unwrap();
        }
        assert!(!relay.is_finished(), "30s of traffic every 6s is not idle");
        tokio::time::sleep(Duration::from_secs(11)).await;
        let err = relay.await.unwrap().unwrap_err();
        assert!(matches!(err, RelayError::Idle(_)), "{err}");
    }
}
