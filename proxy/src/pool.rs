//! Pooled, multiplexed mTLS connections to peer proxies.
//!
//! Each application connection to a meshed destination becomes one HTTP/2
//! `CONNECT` stream on a TLS 1.3 connection shared with other application
//! connections to the same peer. Opening a stream costs a few frames, not a
//! TCP and TLS handshake, which is what makes new connections cheap. A peer
//! gets up to `proxy.pool_max_connections` connections; a new one is
//! opened when every existing one carries `proxy.pool_max_streams` streams,
//! and new streams fill the oldest connection with room, so that the extra
//! connections of a burst fall idle afterwards (see `choose`). Each worker
//! thread has a pool of its own. A connection without streams for
//! `proxy.pool_idle_timeout` is closed. After a failed connect or
//! handshake, a peer is not dialled again until a backoff (50 ms doubling
//! to 5 s, with jitter) has passed: callers meanwhile fail at once instead
//! of each paying a timeout. A connection whose peer has said GOAWAY (a
//! draining proxy) takes no new streams: h2 knows it once the frame is
//! read, before anything is sent, so a request that comes later goes on
//! another connection whatever its retry policy (see `takes_no_streams`),
//! and only one racing the frame is refused, and retried. A destination
//! dialled in-band (a Service address) is the exception to sharing: each
//! application connection to it has a connection of its own ([`Own`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http_body_util::combinators::BoxBody;
use hyper::body::Body as _;
use legate_config::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::batch::Batched;
use crate::h2stream::{self, RecvBody, StreamIo};
use crate::socket::{self, ConnectError};
use crate::tls::{Identity, MESH_ALPN};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// First and longest wait before a failed peer is dialled again.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// HTTP/2 flow-control windows. A stream may have 1 MiB in flight, enough to
/// keep a fast link busy; a connection 8 MiB, so a few bulk streams do not
/// starve the others.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONN_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame either proxy accepts: the protocol's default,
/// 16 KiB, one full TLS record of payload. The receiving proxy can pass
/// data on only once a whole frame has arrived, so a single stream moves
/// as a pipeline of frames; with 64 KiB frames each stage waited for four
/// records before it could start, and a lone bulk stream left the machine
/// a third idle while it fell behind nginx's stream proxy. What the extra
/// frame headers cost per byte stayed within the spread between runs.
pub const MAX_FRAME: u32 = 16 * 1024;

/// Request data queued on a connection beyond what the peer's window
/// takes, at most.
const SEND_BUFFER: usize = 1 << 20;
/// Largest head, request or response, either proxy accepts from the
/// other: room for the cookies and tokens an application may send, which
/// it would get through without the mesh.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// A connection is pinged this often, and closed when a ping goes
/// unanswered for `proxy.peer_timeout`: a peer that vanished without a FIN
/// (a deleted pod, a cut link) and to which nothing is being sent would
/// otherwise hold the connection forever. While bytes are outstanding,
/// both ends' [`socket::give_up_unacknowledged`] ends it sooner.
const PING_INTERVAL: Duration = Duration::from_secs(30);

/// Why a tunnel to a peer proxy could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("mTLS handshake with the peer proxy at {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("the mTLS handshake with {addr} timed out after {timeout:?}")]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
    #[error("the peer at {addr} did not agree to the mesh protocol; it may be a TLS server that is not a legate proxy")]
    NotMesh { addr: SocketAddr },
    #[error(
        "the peer proxy at {addr} failed a moment ago ({last}); not dialling it again for {wait:?}"
    )]
    Backoff {
        addr: SocketAddr,
        last: &'static str,
        wait: Duration,
        /// The failure was a connect that nothing answered.
        unanswered: bool,
    },
    #[error("HTTP/2 with the peer proxy at {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("the connection to the peer proxy at {addr} ended as it was opened")]
    Closed { addr: SocketAddr },
    #[error("the peer proxy refused the tunnel to {target}: {status} {reason}")]
    Refused {
        target: SocketAddr,
        status: http::StatusCode,
        reason: String,
    },
}

impl TunnelError {
    /// A short, fixed label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Connect(e) if e.is_refused() => "connect_refused",
            TunnelError::Connect(_) => "connect_failed",
            TunnelError::Handshake { .. } => "handshake_failed",
            TunnelError::HandshakeTimeout { .. } => "handshake_timeout",
            TunnelError::NotMesh { .. } => "not_mesh",
            TunnelError::Backoff { .. } => "reconnect_backoff",
            TunnelError::Http { .. } => "http2_error",
            TunnelError::Refused { .. } => "refused_by_peer",
            TunnelError::Closed { .. } => "connection_closed",
        }
    }

    /// Whether nothing answered at the peer's mesh port: this connect
    /// failed, or another one did a moment ago and the pool waits before
    /// dialling again. For a destination being probed, the answer that it
    /// has no proxy, for every connection that waited on the same probe.
    pub fn unanswered(&self) -> bool {
        match self {
            TunnelError::Connect(_) => true,
            TunnelError::Backoff { unanswered, .. } => *unanswered,
            _ => false,
        }
    }
}

/// Which connections can be shared: same dial address, same accepted peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub dial: SocketAddr,
    pub identity: Option<SpiffeId>,
}

impl PeerKey {
    /// Whether the peer is dialled at the application's own destination
    /// (a `strict` route, see [`crate::router`]), where the network may
    /// choose another server for each connection, rather than at a peer
    /// proxy's mesh port.
    pub fn in_band(&self, dst: SocketAddr) -> bool {
        self.dial == dst
    }
}

/// Timeouts and socket options for new connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive: Duration,
    /// Connections to one peer proxy, at most.
    pub max_connections: usize,
    /// Streams on a connection before another is opened.
    pub max_streams: usize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// How long the peer may leave a ping, or bytes sent to it,
    /// unanswered before the connection is given up.
    pub peer_timeout: Duration,
}

struct Conn {
    send: SendRequest<Bytes>,
    streams: Arc<Streams>,
    peer: Option<SpiffeId>,
}

/// A connection's open streams, and since when it has had none.
struct Streams {
    open: AtomicUsize,
    /// Set by the connection's task when the connection has ended, or
    /// when the peer said it takes no new streams on it (GOAWAY): no new
    /// stream is put on it.
    closed: AtomicBool,
    /// Milliseconds since the pool's epoch when the last stream closed.
    idle_since: AtomicU64,
    epoch: Instant,
}

impl Streams {
    /// A new connection's count, with the `open` streams its opener
    /// claims.
    fn new(epoch: Instant, open: usize) -> Self {
        Streams {
            open: AtomicUsize::new(open),
            closed: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            epoch,
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.open.load(Ordering::Acquire) != 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::Relaxed));
        Some(now.saturating_duration_since(self.epoch + since))
    }
}

#[derive(Default)]
struct PeerState {
    conns: Vec<Conn>,
    /// Consecutive failed opens, and when the next may be tried.
    failures: u32,
    retry_at: Option<Failed>,
}

/// The last failed open of a connection to a peer.
struct Failed {
    /// When the next open may be tried.
    retry_at: Instant,
    reason: &'static str,
    unanswered: bool,
}

#[derive(Default)]
struct Peer {
    /// Held while choosing or opening a connection, so a burst of new
    /// application connections opens one TLS connection, not hundreds.
    state: tokio::sync::Mutex<PeerState>,
}

/// The pool of connections to peer proxies.
pub struct Pool {
    identity: Identity,
    settings: PoolSettings,
    peers: Mutex<foldhash::HashMap<PeerKey, Arc<Peer>>>,
    epoch: Instant,
    handshakes: Handshakes,
    /// Connections of one application connection each ([`Own`]) now open:
    /// they are in no peer's list, so they are counted as they open and
    /// their tasks end.
    own_open: Arc<AtomicUsize>,
}

/// mTLS handshakes with peer proxies, for metrics: completed, and failed by
/// reason (`handshake_failed`, `handshake_timeout`, `not_mesh`).
#[derive(Debug, Default)]
struct Handshakes {
    ok: AtomicU64,
    failed: [AtomicU64; 3],
}

/// A stream to the peer proxy's side of the tunnel. Counts against its
/// connection's stream budget until dropped.
pub struct Tunnel {
    pub io: StreamIo,
    /// The verified identity of the peer proxy.
    pub peer: Option<SpiffeId>,
    _guard: StreamGuard,
}

/// A claimed stream on a pooled connection.
pub struct Sender {
    send: SendRequest<Bytes>,
    /// The verified identity of the peer proxy.
    pub peer: Option<SpiffeId>,
    dial: SocketAddr,
    _guard: StreamGuard,
}

impl Sender {
    fn error(&self) -> impl Fn(h2::Error) -> TunnelError {
        let addr = self.dial;
        move |source| TunnelError::Http { addr, source }
    }

    /// Opens the stream with the request's head; `end` when nothing follows.
    async fn start(
        &mut self,
        req: http::Request<()>,
        end: bool,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), TunnelError> {
        // Waits while the peer's limit on concurrent streams is reached.
        let sent = match std::future::poll_fn(|cx| self.send.poll_ready(cx)).await {
            Ok(()) => self.send.send_request(req, end),
            Err(e) => Err(e),
        };
        self.opened(sent)
    }

    /// The stream opened, or why not, once the connection was ready for
    /// it or had failed: for [`Self::start`] and [`Sending`] alike.
    fn opened(
        &self,
        sent: Result<(h2::client::ResponseFuture, SendStream<Bytes>), h2::Error>,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), TunnelError> {
        if let Err(e) = &sent {
            if e.is_go_away() && e.is_remote() {
                // The peer takes no new streams here (a draining proxy),
                // though the connection lives on for those in flight: the
                // next stream, this one's retry among them, goes on a new
                // connection, which may reach another proxy (a new one, or
                // another pod of a Service).
                self._guard.0.closed.store(true, Ordering::Release);
            }
        }
        sent.map_err(self.error())
    }

    /// Sends a request to the peer proxy and waits for its response head.
    /// The body streams on from this task while it is ready and from a
    /// task of its own once it has to wait.
    ///
    /// Not an async fn: every request's future is created and then moved,
    /// whole, into each future that awaits it, and an async fn keeps its
    /// arguments beside the locals taken from them, and the request's head
    /// beside the future opening the stream with it. [`Sending`] holds the
    /// head only until the stream is open, in the space the wait for the
    /// answer then takes.
    pub fn send(self, req: http::Request<Body>) -> Sending {
        let (mut head, body) = req.into_parts();
        set_content_length(&mut head, &body);
        let end = body.is_end_stream();
        Sending {
            sender: self,
            step: Step::Ready {
                head: http::Request::from_parts(head, ()),
                body,
                end,
            },
        }
    }

    /// Sends the head of a request whose stream becomes a byte tunnel (a
    /// `CONNECT`), and waits for the answer. The caller decides from the
    /// status whether the stream is a tunnel or an ordinary response.
    pub async fn exchange(
        mut self,
        req: http::Request<()>,
    ) -> Result<(http::Response<RecvStream>, SendStream<Bytes>), TunnelError> {
        self.round_trip(req).await
    }

    async fn round_trip(
        &mut self,
        req: http::Request<()>,
    ) -> Result<(http::Response<RecvStream>, SendStream<Bytes>), TunnelError> {
        let (response, stream) = self.start(req, false).await?;
        let res = response.await.map_err(self.error())?;
        Ok((res, stream))
    }

    /// Opens a `CONNECT` tunnel through the peer proxy to `target`.
    pub async fn connect(mut self, target: SocketAddr) -> Result<Tunnel, TunnelError> {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .map_err(|e| TunnelError::Refused {
                target,
                status: http::StatusCode::BAD_REQUEST,
                reason: e.to_string(),
            })?;
        let (res, stream) = self.round_trip(req).await?;
        if res.status() != http::StatusCode::OK {
            let status = res.status();
            let reason = res
                .headers()
                .get("legate-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| status.canonical_reason().unwrap_or(""))
                .to_owned();
            return Err(TunnelError::Refused {
                target,
                status,
                reason,
            });
        }
        Ok(Tunnel {
            io: StreamIo::new(stream, res.into_body()),
            peer: self.peer,
            _guard: self._guard,
        })
    }
}

/// A request on its way to the peer proxy: [`Sender::send`].
pub struct Sending {
    /// Kept to the end, as its stream counts against the connection's
    /// budget until the answer's head is in.
    sender: Sender,
    step: Step,
}

enum Step {
    /// Waiting for the connection to take another stream.
    Ready {
        head: http::Request<()>,
        body: Body,
        /// Nothing follows the head.
        end: bool,
    },
    /// Waiting for the answer's head. The stream, and the body, of a
    /// request that had none to send are dropped only then, as the task
    /// sending a body holds its own until the body ends.
    Answer {
        response: h2::client::ResponseFuture,
        _unsent: Option<(Body, SendStream<Bytes>)>,
    },
    Done,
}

impl Future for Sending {
    type Output = Result<http::Response<RecvBody>, TunnelError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Step::Ready { .. } = this.step {
            // Waits while the peer's limit on concurrent streams is reached.
            let room = ready!(this.sender.send.poll_ready(cx));
            let Step::Ready { head, body, end } = std::mem::replace(&mut this.step, Step::Done)
            else {
                unreachable!("the step was just matched")
            };
            let sent = room.and_then(|()| this.sender.send.send_request(head, end));
            let (response, stream) = this.sender.opened(sent)?;
            let unsent = if end {
                Some((body, stream))
            } else {
                h2stream::send_body(body, stream, cx);
                None
            };
            this.step = Step::Answer {
                response,
                _unsent: unsent,
            };
        }
        let Step::Answer { response, .. } = &mut this.step else {
            panic!("a request's answer was awaited again after it had come");
        };
        let res = ready!(Pin::new(response).poll(cx));
        this.step = Step::Done;
        let (head, recv) = res.map_err(this.sender.error())?.into_parts();
        let body = RecvBody::new(recv, &head.headers);
        Poll::Ready(Ok(http::Response::from_parts(head, body)))
    }
}

/// A mesh connection of one application connection's own, for a
/// destination dialled in-band (see [`crate::router`]): the network may send
/// each new connection to such an address to another server, as kube-proxy
/// does for a Service address, and a connection shared by all of a worker's
/// application connections would take every one of them to the server it
/// happened to reach first. The connection ends once the last clone of this
/// handle and the last of its streams are gone.
#[derive(Clone)]
pub struct Own {
    send: SendRequest<Bytes>,
    streams: Arc<Streams>,
    peer: Option<SpiffeId>,
    dial: SocketAddr,
}

impl Own {
    /// A stream on the connection, unless the connection has ended.
    pub fn sender(&self) -> Option<Sender> {
        if self.streams.is_closed() {
            return None;
        }
        let mut send = self.send.clone();
        if takes_no_streams(&mut send) {
            self.streams.closed.store(true, Ordering::Release);
            return None;
        }
        self.streams.open.fetch_add(1, Ordering::AcqRel);
        Some(Sender {
            send,
            peer: self.peer.clone(),
            dial: self.dial,
            _guard: StreamGuard(self.streams.clone()),
        })
    }
}

/// A body of known length is announced as such, as an HTTP/1.1 message of
/// that length would be: the server's proxy can then hand it on without
/// chunking.
pub(crate) fn set_content_length(head: &mut http::request::Parts, body: &Body) {
    let Some(len) = body.size_hint().exact() else {
        return;
    };
    let payload = matches!(
        head.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    );
    if (len != 0 || payload) && !head.headers.contains_key(http::header::CONTENT_LENGTH) {
        head.headers
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
}

/// Whether the connection behind `send` will open no more streams: its
/// peer said GOAWAY or its stream ids ran out. h2 answers from what its
/// connection task has already read, without sending or waiting; `send`
/// is a copy that never waits for a stream of its own, so it is never
/// left pending.
fn takes_no_streams(send: &mut SendRequest<Bytes>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(send.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
}

/// Which open connection takes a new stream, given each one's streams in
/// the order they were opened; `None` to open another. The oldest with
/// room, not the least loaded: all of a worker's connections are driven by
/// its one thread, so spreading streams gains no parallelism, while
/// packing them lets one write carry many streams' frames and lets the
/// extra connections a burst opened fall idle and close. Only when every
/// connection is full and no more may open does the least loaded take it.
fn choose(
    loads: impl Iterator<Item = usize> + Clone,
    max_streams: usize,
    max_connections: usize,
) -> Option<usize> {
    if let Some(i) = loads.clone().position(|l| l < max_streams) {
        return Some(i);
    }
    if loads.clone().count() < max_connections {
        return None;
    }
    loads.enumerate().min_by_key(|&(_, l)| l).map(|(i, _)| i)
}

/// Pings the peer until it fails to answer within `patience`; returns why.
pub(crate) async fn keep_alive(pings: Option<h2::PingPong>, patience: Duration) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(patience, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keep-alive ping failed: {e}"),
            Err(_) => return format!("no answer to a keep-alive ping in {patience:?}"),
        }
    }
}

struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since
            .store(s.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        s.open.fetch_sub(1, Ordering::Release);
    }
}

impl Pool {
    pub fn new(identity: Identity, settings: PoolSettings) -> Self {
        Pool {
            identity,
            settings,
            peers: Mutex::new(foldhash::HashMap::default()),
            epoch: Instant::now(),
            handshakes: Handshakes::default(),
            own_open: Arc::default(),
        }
    }

    /// mTLS handshakes so far: completed, and failed as
    /// `[handshake_failed, handshake_timeout, not_mesh]`.
    pub fn handshakes(&self) -> (u64, [u64; 3]) {
        let h = &self.handshakes;
        (
            h.ok.load(Ordering::Relaxed),
            [0, 1, 2].map(|i| h.failed[i].load(Ordering::Relaxed)),
        )
    }

    /// Closes connections idle longer than the idle timeout and forgets
    /// peers with nothing left. Called periodically by the proxy.
    pub fn sweep(&self) {
        let now = Instant::now();
        let idle = self.settings.idle_timeout;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|_, peer| {
            // A peer busy opening a connection is left for the next sweep.
            let Ok(mut state) = peer.state.try_lock() else {
                return true;
            };
            state.conns.retain(|c| {
                !c.streams.is_closed() && c.streams.idle_for(now).is_none_or(|d| d < idle)
            });
            !state.conns.is_empty() || state.retry_at.as_ref().is_some_and(|f| f.retry_at > now)
        });
    }

    /// A stream slot on a connection to the peer at `key.dial`, opening
    /// the connection if needed. Nothing is sent yet, so a caller that
    /// learns here that no proxy answers still holds its request.
    pub async fn sender(&self, key: &PeerKey) -> Result<Sender, TunnelError> {
        let peer = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers.entry(key.clone()).or_default().clone()
        };
        let (send, streams, peer_id) = self.checkout(&peer, key).await?;
        Ok(Sender {
            send,
            peer: peer_id,
            dial: key.dial,
            _guard: StreamGuard(streams),
        })
    }

    /// Opens a tunnel through the peer at `key.dial` to `target`, on a
    /// pooled connection or, with `own`, on a connection of its own.
    pub async fn tunnel(
        &self,
        key: &PeerKey,
        target: SocketAddr,
        own: bool,
    ) -> Result<Tunnel, TunnelError> {
        let sender = if own {
            let own = self.own(key).await?;
            own.sender()
                .ok_or_else(|| TunnelError::Closed { addr: key.dial })?
        } else {
            self.sender(key).await?
        };
        sender.connect(target).await
    }

    /// Opens a connection to the peer at `key.dial` that is not shared
    /// through the pool.
    pub async fn own(&self, key: &PeerKey) -> Result<Own, TunnelError> {
        // Counted as its senders are made, not as a pooled checkout.
        let streams = Arc::new(Streams::new(self.epoch, 0));
        let counted = Some(self.own_open.clone());
        let (send, peer) = Box::pin(self.open(key, streams.clone(), counted)).await?;
        Ok(Own {
            send,
            streams,
            peer,
            dial: key.dial,
        })
    }

    /// Picks the least-loaded live connection, or opens one.
    async fn checkout(
        &self,
        peer: &Peer,
        key: &PeerKey,
    ) -> Result<(SendRequest<Bytes>, Arc<Streams>, Option<SpiffeId>), TunnelError> {
        let s = &self.settings;
        let mut state = peer.state.lock().await;
        loop {
            state.conns.retain(|c| !c.streams.is_closed());
            let loads = state
                .conns
                .iter()
                .map(|c| c.streams.open.load(Ordering::Relaxed));
            let Some(i) = choose(loads, s.max_streams, s.max_connections) else {
                break;
            };
            let c = &mut state.conns[i];
            if takes_no_streams(&mut c.send) {
                c.streams.closed.store(true, Ordering::Release);
                continue;
            }
            c.streams.open.fetch_add(1, Ordering::AcqRel);
            return Ok((c.send.clone(), c.streams.clone(), c.peer.clone()));
        }
        let now = Instant::now();
        if let Some(f) = &state.retry_at {
            if f.retry_at > now {
                return Err(TunnelError::Backoff {
                    addr: key.dial,
                    last: f.reason,
                    wait: f.retry_at - now,
                    unanswered: f.unanswered,
                });
            }
        }
        // Boxed: dialling and the handshakes make a future of several
        // kilobytes, and every request's future would otherwise carry (and
        // move) that space although nearly all of them find a connection.
        let streams = Arc::new(Streams::new(self.epoch, 1));
        match Box::pin(self.open(key, streams.clone(), None)).await {
            Ok((send, peer_id)) => {
                state.failures = 0;
                state.retry_at = None;
                state.conns.push(Conn {
                    send: send.clone(),
                    streams: streams.clone(),
                    peer: peer_id.clone(),
                });
                Ok((send, streams, peer_id))
            }
            Err(e) => {
                state.failures = state.failures.saturating_add(1);
                let ceiling = BACKOFF_BASE
                    .saturating_mul(1 << state.failures.min(16).saturating_sub(1))
                    .min(BACKOFF_MAX);
                let wait = ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                state.retry_at = Some(Failed {
                    retry_at: Instant::now() + wait,
                    reason: e.reason(),
                    unanswered: e.unanswered(),
                });
                Err(e)
            }
        }
    }

    /// TCP connect, mTLS handshake and HTTP/2 handshake to a peer proxy;
    /// `counted` counts the connection while it is open.
    async fn open(
        &self,
        key: &PeerKey,
        streams: Arc<Streams>,
        counted: Option<Arc<AtomicUsize>>,
    ) -> Result<(SendRequest<Bytes>, Option<SpiffeId>), TunnelError> {
        let s = self.settings;
        let tcp = socket::connect(key.dial, s.connect_timeout, s.keepalive).await?;
        socket::give_up_unacknowledged(&tcp, s.peer_timeout);
        let config = self.identity.client_config(key.identity.as_ref());
        let name = ServerName::IpAddress(key.dial.ip().into());
        let mut tls = tokio::time::timeout(
            s.handshake_timeout,
            TlsConnector::from(config).connect(name, socket::tls_transport(tcp)),
        )
        .await
        .map_err(|_| {
            self.handshakes.failed[1].fetch_add(1, Ordering::Relaxed);
            TunnelError::HandshakeTimeout {
                addr: key.dial,
                timeout: s.handshake_timeout,
            }
        })?
        .map_err(|e| {
            self.handshakes.failed[0].fetch_add(1, Ordering::Relaxed);
            TunnelError::Handshake {
                addr: key.dial,
                reason: e.to_string(),
            }
        })?;
        socket::limit_tls_writes(tls.get_mut().1);
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(MESH_ALPN) {
            self.handshakes.failed[2].fetch_add(1, Ordering::Relaxed);
            return Err(TunnelError::NotMesh { addr: key.dial });
        }
        self.handshakes.ok.fetch_add(1, Ordering::Relaxed);
        let peer_id = self.identity.peer_id(session);
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(Batched::new(tls))
            .await
            .map_err(|source| TunnelError::Http {
                addr: key.dial,
                source,
            })?;
        let dial = key.dial;
        let pings = conn.ping_pong();
        let patience = s.peer_timeout;
        if let Some(c) = &counted {
            c.fetch_add(1, Ordering::Relaxed);
        }
        tokio::spawn(async move {
            tokio::select! {
                res = &mut conn => {
                    if let Err(e) = res {
                        debug!(peer = %dial, error = %e, "connection to peer proxy ended");
                    }
                }
                why = keep_alive(pings, patience) => {
                    debug!(peer = %dial, why, "closing the connection to the peer proxy");
                }
            }
            streams.closed.store(true, Ordering::Release);
            if let Some(c) = counted {
                c.fetch_sub(1, Ordering::Relaxed);
            }
        });
        debug!(peer = %dial, id = ?peer_id, "opened mesh connection");
        Ok((send, peer_id))
    }

    /// Connections of one application connection each now open.
    pub fn own_connections(&self) -> usize {
        self.own_open.load(Ordering::Relaxed)
    }

    /// Pooled connections currently open, for metrics and tests.
    pub fn open_connections(&self) -> usize {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .values()
            .map(|p| p.state.try_lock().map(|s| s.conns.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_streams_fill_the_oldest_connection_with_room() {
        let pick = |loads: &[usize]| choose(loads.iter().copied(), 100, 4);
        // After a burst: four connections, nearly idle. Packing keeps the
        // first busy and lets the other three time out.
        assert_eq!(pick(&[3, 0, 1, 0]), Some(0));
        assert_eq!(pick(&[100, 7, 0]), Some(1));
        // All full, room for another connection: open it.
        assert_eq!(pick(&[100, 100]), None);
        assert_eq!(pick(&[]), None);
        // All full and no more allowed: the least loaded one.
        assert_eq!(pick(&[104, 101, 100, 102]), Some(2));
    }

    /// Never consulted: these tests fail before any TLS.
    struct NoIdentity;

    impl crate::tls::MeshIdentity for NoIdentity {
        fn local_id(&self) -> SpiffeId {
            unreachable!()
        }
        fn trust_domain(&self) -> legate_config::TrustDomain {
            unreachable!()
        }
        fn server_config(&self) -> Arc<rustls::ServerConfig> {
            unreachable!()
        }
        fn client_config(&self, _: Option<&SpiffeId>) -> Arc<rustls::ClientConfig> {
            unreachable!()
        }
        fn peer_id(&self, _: &rustls::CommonState) -> Option<SpiffeId> {
            unreachable!()
        }
        fn ready(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
            unreachable!()
        }
        fn is_ready(&self) -> bool {
            unreachable!()
        }
    }

    #[tokio::test]
    async fn a_peer_that_failed_is_not_dialled_again_until_its_backoff_passes() {
        // A port nobody listens on: the connect is refused at once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dial = closed.local_addr().unwrap();
        drop(closed);
        let pool = Pool::new(
            Arc::new(NoIdentity),
            PoolSettings {
                connect_timeout: Duration::from_secs(1),
                handshake_timeout: Duration::from_secs(1),
                keepalive: Duration::from_secs(60),
                max_connections: 4,
                max_streams: 100,
                idle_timeout: Duration::from_secs(90),
                peer_timeout: Duration::from_secs(10),
            },
        );
        let key = PeerKey {
            dial,
            identity: None,
        };
        let first = pool.sender(&key).await.err().unwrap();
        assert!(matches!(first, TunnelError::Connect(_)), "{first}");
        let second = pool.sender(&key).await.err().unwrap();
        assert!(matches!(second, TunnelError::Backoff { .. }), "{second}");
        assert!(second.to_string().contains("connect_refused"), "{second}");
        assert!(second.unanswered(), "{second}");
        tokio::time::sleep(BACKOFF_BASE).await;
        let third = pool.sender(&key).await.err().unwrap();
        assert!(
            matches!(third, TunnelError::Connect(_)),
            "dialled again after the backoff: {third}"
        );
        // The sweep forgets the peer once its backoff is over and it has no connections.
        tokio::time::sleep(BACKOFF_BASE * 2).await;
        pool.sweep();
        assert!(pool.peers.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_connection_whose_peer_said_goaway_is_seen_to_take_no_streams() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            // One request in flight keeps the connection open past the
            // GOAWAY, as a draining proxy's long answer does.
            let (_req, _respond) = conn.accept().await.unwrap().unwrap();
            conn.graceful_shutdown();
            std::future::poll_fn(|cx| conn.poll_closed(cx)).await
        });
        let (mut send, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        assert!(!takes_no_streams(&mut send));
        let (_in_flight, _) = send
            .send_request(http::Request::get("http://a/").body(()).unwrap(), true)
            .unwrap();
        let mut copy = send.clone();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !takes_no_streams(&mut copy) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the GOAWAY is seen");
        assert!(!server.is_finished());
    }
}
