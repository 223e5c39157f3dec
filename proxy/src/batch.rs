//! Write batching for HTTP/2 connections: the pooled mesh connections, and
//! the application's own HTTP/2 connections to its proxy.
//!
//! Many requests share one connection, and each is answered (or sent) by
//! its own task. Written the moment it is ready, every response becomes
//! its own system call, TCP segment and (over mTLS) TLS record, and wakes
//! the peer once more: under load that per-segment kernel work, on both
//! proxies, costs more than the proxying itself. [`Batched`] holds what
//! the HTTP/2 connection writes and, on the first flush of a burst, lets
//! the tasks already queued on the runtime run before writing: the streams
//! they complete leave in the same write. With nothing else queued the
//! wait is one task switch.
//!
//! Deferring a flush is sound here because the HTTP/2 connection that owns
//! the stream flushes at the end of every poll, and a deferred flush always
//! has a wake-up registered that brings that poll. Any other owner must
//! flush the same way: a flush answered "done" may still hold bytes until
//! the next one. Large writes (bulk data) skip the buffer.

use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};

use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes held before they are passed on even without a flush.
pub const MAX_HELD: usize = 64 * 1024;
/// Writes at least this large go straight through once the buffer is
/// empty: copying them gains nothing.
const PASS_THROUGH: usize = 16 * 1024;

/// An I/O stream whose flushes wait for the end of the runtime's round.
/// Reads pass straight through.
pub struct Batched<T> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` the inner stream has taken.
    written: usize,
    round: Arc<Round>,
}

/// The state of a deferred flush, shared with the wake-up that ends it.
#[derive(Default)]
struct Round {
    /// Bytes are held for a flush that was answered but not yet done.
    armed: AtomicBool,
    /// The tasks queued at the deferral have run: write now.
    over: AtomicBool,
    /// The connection's task, for the fallback wake-up.
    task: Mutex<Option<Waker>>,
}

impl Wake for Round {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    /// The fallback: tokio calls this after its next poll of the I/O
    /// driver, in case the connection's next poll did not read first.
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        self.over.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<T> Batched<T> {
    pub fn new(inner: T) -> Self {
        Batched {
            inner,
            held: Vec::new(),
            written: 0,
            round: Arc::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.written == self.held.len()
    }

    /// Defers the flush of the held bytes to the connection's next poll,
    /// which comes after the tasks queued now: waking the task puts it at
    /// the back of the run queue, and that poll's first read ends the
    /// round. Should that poll flush before it reads, a second wake-up,
    /// after tokio's next poll of its I/O driver (where `yield_now`
    /// defers to; its future is polled once with a waker of ours, which
    /// tokio keeps when the future is dropped), ends the round instead.
    fn arm(&mut self, cx: &Context<'_>) {
        let round = &self.round;
        round.over.store(false, Ordering::Release);
        round.armed.store(true, Ordering::Release);
        *round.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        let fallback = Waker::from(round.clone());
        let _ = pin!(tokio::task::yield_now()).poll(&mut Context::from_waker(&fallback));
        cx.waker().wake_by_ref();
    }
}

impl<T: AsyncWrite + Unpin> Batched<T> {
    /// Passes every held byte to the inner stream.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        self.held.clear();
        // A burst of bulk data should not pin its buffer to the connection.
        if self.held.capacity() > PASS_THROUGH {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Batched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.round.armed.load(Ordering::Relaxed) {
            self.round.over.store(true, Ordering::Relaxed);
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Batched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let this = &mut *self;
        if this.held.len() - this.written + len > MAX_HELD {
            ready!(this.drain(cx))?;
        }
        if len >= PASS_THROUGH && this.is_empty() {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.is_empty() {
            if !this.round.armed.load(Ordering::Acquire) {
                this.arm(cx);
                return Poll::Ready(Ok(()));
            }
            if !this.round.over.load(Ordering::Acquire) {
                // Still the same round: more may join these bytes.
                return Poll::Ready(Ok(()));
            }
            ready!(this.drain(cx))?;
            this.round.armed.store(false, Ordering::Release);
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        self.round.armed.store(false, Ordering::Release);
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn pair() -> (Batched<DuplexStream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (Batched::new(a), b)
    }

    async fn flush(b: &mut Batched<DuplexStream>) {
        poll_fn(|cx| Pin::new(&mut *b).poll_flush(cx))
            .await
            .expect("flush");
    }

    /// What the peer can read right now, without letting the runtime run.
    async fn received_now(peer: &mut DuplexStream) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *peer).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(rb.filled().to_vec()),
                _ => Poll::Ready(Vec::new()),
            }
        })
        .await
    }

    /// What the peer receives within a moment (the runtime polls its
    /// driver meanwhile).
    async fn received(peer: &mut DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(20), peer.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[tokio::test]
    async fn a_burst_leaves_in_one_write_after_the_queued_tasks_ran() {
        let (mut b, mut peer) = pair();
        b.write_all(b"one ").await.unwrap();
        flush(&mut b).await;
        // The first flush of a burst holds the bytes for this round...
        b.write_all(b"two").await.unwrap();
        flush(&mut b).await;
        assert_eq!(received_now(&mut peer).await, b"");
        // ...and the poll after the tasks queued meanwhile (here, a read,
        // as the HTTP/2 connection does first) writes them all.
        let mut nothing = [0u8; 1];
        let _ = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut nothing);
            let _ = Pin::new(&mut b).poll_read(cx, &mut rb);
            Poll::Ready(())
        })
        .await;
        flush(&mut b).await;
        assert_eq!(received_now(&mut peer).await, b"one two");
    }

    #[tokio::test]
    async fn without_a_read_the_fallback_wake_up_ends_the_round() {
        let (mut b, mut peer) = pair();
        b.write_all(b"held").await.unwrap();
        flush(&mut b).await;
        assert_eq!(received(&mut peer).await, b"");
        // The runtime polls its driver (the sleep inside `received` lets it),
        // and the deferred wake-up marks the round over.
        flush(&mut b).await;
        assert_eq!(received(&mut peer).await, b"held");
    }

    #[tokio::test]
    async fn large_writes_pass_straight_through_in_order() {
        let (mut b, mut peer) = pair();
        b.write_all(b"head").await.unwrap();
        let bulk = vec![7u8; 2 * MAX_HELD];
        b.write_all(&bulk).await.unwrap();
        // No flush yet: the held bytes went first to keep the order, then
        // the bulk write without a copy.
        let got = received(&mut peer).await;
        assert_eq!(got.len(), 4 + bulk.len());
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&x| x == 7));
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held() {
        let (mut b, mut peer) = pair();
        b.write_all(b"last words").await.unwrap();
        flush(&mut b).await;
        b.shutdown().await.unwrap();
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last words");
    }
}
