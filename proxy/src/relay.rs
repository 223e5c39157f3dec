//! Opaque bidirectional copy between two streams.
//!
//! Bytes flow both ways at once with backpressure (a slow reader slows its
//! writer, nothing queues without bound), and a half-close is carried
//! across: when one side shuts down its writes the other side's write half
//! is shut down too, and data still flows the other way until that side
//! finishes. A connection with no bytes in either direction for the idle
//! timeout is closed.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Per-direction buffer. 16 KiB is one full TLS record, so a TLS side is
/// written in whole records, while a thousand idle connections still cost
/// only 32 MiB at most (buffers are allocated on first use by tokio).
const BUF_SIZE: usize = 16 * 1024;

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

/// Copies both ways until both sides finish, a side fails, or the
/// connection idles for `idle`.
pub async fn relay<A, B>(client: A, server: B, idle: Duration) -> Result<Transferred, RelayError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let mut client = Activity {
        inner: client,
        start,
        last: activity.clone(),
    };
    let mut server = Activity {
        inner: server,
        start,
        last: activity.clone(),
    };
    let copy =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, BUF_SIZE, BUF_SIZE);
    tokio::pin!(copy);
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = start + last + idle;
        tokio::select! {
            res = &mut copy => {
                let (sent, received) = res?;
                return Ok(Transferred { sent, received });
            }
            _ = tokio::time::sleep_until(deadline) => {
                let seen = Duration::from_millis(activity.load(Ordering::Relaxed));
                if seen == last {
                    return Err(RelayError::Idle(idle));
                }
            }
        }
    }
}

/// Records the time of the latest read, so the idle check costs one
/// relaxed store per read rather than a timer reset.
struct Activity<S> {
    inner: S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
