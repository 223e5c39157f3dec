//! What the proxy records about one accepted connection: the TCP metrics of
//! its `(direction, peer)` series, and its access log line.
//!
//! A [`ConnMeter`] is made once the protocol is known and lives as long as
//! anything handling the connection holds it. [`Metered`] wraps the socket
//! and counts bytes as they are read and written: one relaxed atomic add
//! per read or write call, never per byte. The peer identity is often
//! learnt later than the connection opens (after a tunnel to the peer proxy
//! is up, or with the first HTTP request); bytes moved before that wait in
//! the meter and join the peer's series when it is known, which is also
//! when the connection counts as opened. A connection that closes before a
//! peer is known counts under `unknown`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use legate_config::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::access::{AccessLog, Line};
use crate::metrics::{Direction, Metrics, PeerStats};

/// The fields of a connection's access log line.
struct LogFields {
    access: Arc<AccessLog>,
    time: SystemTime,
    client: SocketAddr,
    dst: SocketAddr,
    protocol: &'static str,
    read: AtomicU64,
    written: AtomicU64,
    error: Mutex<Option<&'static str>>,
}

/// Metrics and the access log of one accepted connection.
pub struct ConnMeter {
    metrics: Arc<Metrics>,
    dir: Direction,
    started: Instant,
    stats: OnceLock<Arc<PeerStats>>,
    peer: OnceLock<Option<SpiffeId>>,
    pending_read: AtomicU64,
    pending_written: AtomicU64,
    log: Option<LogFields>,
}

impl ConnMeter {
    /// A meter for a connection from `client` to `dst`. `protocol` is what
    /// detection found: `tcp`, `http1`, `h2` or `mtls` (a peer proxy).
    pub fn new(
        metrics: Arc<Metrics>,
        access: &Arc<AccessLog>,
        dir: Direction,
        client: SocketAddr,
        dst: SocketAddr,
        protocol: &'static str,
    ) -> Arc<Self> {
        let log = access.sampled().then(|| LogFields {
            access: access.clone(),
            time: SystemTime::now(),
            client,
            dst,
            protocol,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        Arc::new(ConnMeter {
            metrics,
            dir,
            started: Instant::now(),
            stats: OnceLock::new(),
            peer: OnceLock::new(),
            pending_read: AtomicU64::new(0),
            pending_written: AtomicU64::new(0),
            log,
        })
    }

    /// Records who is at the other end of the mesh hop (`None`: plaintext).
    /// The first call wins; later ones are ignored.
    pub fn set_peer(&self, peer: Option<&SpiffeId>) {
        if self.stats.get().is_some() {
            return;
        }
        let label = peer.map_or("none", SpiffeId::as_str);
        self.resolve(label, peer.cloned());
    }

    fn resolve(&self, label: &str, peer: Option<SpiffeId>) {
        let stats = self.metrics.peer(self.dir, label);
        if self.stats.set(stats.clone()).is_ok() {
            let _ = self.peer.set(peer);
            stats.open();
            self.flush(&stats);
        }
    }

    fn flush(&self, stats: &PeerStats) {
        let r = self.pending_read.swap(0, Ordering::Relaxed);
        let w = self.pending_written.swap(0, Ordering::Relaxed);
        if r > 0 {
            stats.add_read(r);
        }
        if w > 0 {
            stats.add_written(w);
        }
    }

    /// Records the proxy's own reason when it ends the connection itself.
    pub fn fail(&self, reason: &'static str) {
        if let Some(log) = &self.log {
            *log.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        }
    }

    fn on_read(&self, n: u64) {
        match self.stats.get() {
            Some(s) => s.add_read(n),
            None => {
                self.pending_read.fetch_add(n, Ordering::Relaxed);
            }
        }
        if let Some(log) = &self.log {
            log.read.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts bytes written to the connection other than through
    /// [`Metered`].
    pub fn count_written(&self, n: usize) {
        if n > 0 {
            self.on_write(n as u64);
        }
    }

    fn on_write(&self, n: u64) {
        match self.stats.get() {
            Some(s) => s.add_written(n),
            None => {
                self.pending_written.fetch_add(n, Ordering::Relaxed);
            }
        }
        if let Some(log) = &self.log {
            log.written.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Drop for ConnMeter {
    fn drop(&mut self) {
        if self.stats.get().is_none() {
            self.resolve("unknown", None);
        }
        let lasted = self.started.elapsed();
        if let Some(stats) = self.stats.get() {
            // Bytes counted while the peer was being set.
            self.flush(stats);
            stats.close(lasted);
        }
        let Some(log) = &self.log else { return };
        let peer = self.peer.get().cloned().flatten();
        let local = log.access.local_id();
        let remote = peer.as_ref().map(SpiffeId::as_str);
        let (source_id, destination_id) = match self.dir {
            Direction::Outbound => (local, remote),
            Direction::Inbound => (remote, local),
        };
        let error = *log.error.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = Line::new(log.time, "tcp");
        line.str("direction", self.dir.as_str())
            .display("source", log.client)
            .display("destination", log.dst)
            .opt_str("source_id", source_id)
            .opt_str("destination_id", destination_id)
            .str("protocol", log.protocol)
            .num("bytes_read", log.read.load(Ordering::Relaxed))
            .num("bytes_written", log.written.load(Ordering::Relaxed))
            .millis("duration_ms", lasted)
            .opt_str("error", error);
        log.access.emit(line.finish());
    }
}

/// A socket whose bytes are counted by a [`ConnMeter`].
pub struct Metered<S> {
    inner: S,
    meter: Arc<ConnMeter>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Arc<ConnMeter>) -> Self {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.meter.on_read(n as u64);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.meter.on_write(n as u64);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.meter.on_write(n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
