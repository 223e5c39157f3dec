//! Pooled, multiplexed mTLS connections to peer proxies.
//!
//! Each application connection to a meshed destination becomes one HTTP/2
//! `CONNECT` stream on a TLS 1.3 connection shared with other application
//! connections to the same peer. Opening a stream costs a few frames, not a
//! TCP and TLS handshake, which is what makes new connections cheap. A peer
//! gets up to [`MAX_CONNS_PER_PEER`] connections; a new one is opened when
//! every existing one carries [`STREAMS_PER_CONN`] streams, so that one
//! busy peer is spread over several TCP connections and CPU cores.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use legate_config::SpiffeId;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::socket::{self, ConnectError};
use crate::tls::{Identity, MESH_ALPN};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Upper bound on connections to one peer proxy.
pub const MAX_CONNS_PER_PEER: usize = 4;
/// Streams per connection before another connection is opened.
pub const STREAMS_PER_CONN: usize = 100;
/// HTTP/2 flow-control windows. A stream may have 1 MiB in flight, enough to
/// keep a fast link busy; a connection 8 MiB, so a few bulk streams do not
/// starve the others.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONN_WINDOW: u32 = 8 << 20;

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
    #[error("HTTP/2 with the peer proxy at {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
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
            TunnelError::Http { .. } => "http2_error",
            TunnelError::Refused { .. } => "refused_by_peer",
        }
    }
}

/// Which connections can be shared: same dial address, same accepted peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub dial: SocketAddr,
    pub identity: Option<SpiffeId>,
}

/// Timeouts and socket options for new connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive: Duration,
}

struct Conn {
    send: SendRequest<Body>,
    streams: Arc<AtomicUsize>,
    peer: Option<SpiffeId>,
}

#[derive(Default)]
struct Peer {
    /// Held while choosing or opening a connection, so a burst of new
    /// application connections opens one TLS connection, not hundreds.
    conns: tokio::sync::Mutex<Vec<Conn>>,
}

/// The pool of connections to peer proxies.
pub struct Pool {
    identity: Identity,
    settings: PoolSettings,
    peers: Mutex<HashMap<PeerKey, Arc<Peer>>>,
}

/// A stream to the peer proxy's side of the tunnel. Counts against its
/// connection's stream budget until dropped.
pub struct Tunnel {
    pub io: TokioIo<hyper::upgrade::Upgraded>,
    /// The verified identity of the peer proxy.
    pub peer: Option<SpiffeId>,
    _guard: StreamGuard,
}

/// A claimed stream on a pooled connection.
pub struct Sender {
    send: SendRequest<Body>,
    /// The verified identity of the peer proxy.
    pub peer: Option<SpiffeId>,
    dial: SocketAddr,
    _guard: StreamGuard,
}

impl Sender {
    async fn request(
        &mut self,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, TunnelError> {
        let addr = self.dial;
        self.send
            .send_request(req)
            .await
            .map_err(|source| TunnelError::Http { addr, source })
    }

    /// Sends a request to the peer proxy and waits for its response head.
    pub async fn send(
        mut self,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, TunnelError> {
        self.request(req).await
    }

    /// Opens a `CONNECT` tunnel through the peer proxy to `target`.
    pub async fn connect(mut self, target: SocketAddr) -> Result<Tunnel, TunnelError> {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| TunnelError::Refused {
                target,
                status: http::StatusCode::BAD_REQUEST,
                reason: e.to_string(),
            })?;
        let res = self.request(req).await?;
        let io = upgrade_ok(res, target, self.dial).await?;
        Ok(Tunnel {
            io,
            peer: self.peer,
            _guard: self._guard,
        })
    }
}

/// Turns the peer's answer to a tunnel request into the tunnel itself, or
/// into the reason it refused.
pub async fn upgrade_ok(
    mut res: http::Response<hyper::body::Incoming>,
    target: SocketAddr,
    dial: SocketAddr,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, TunnelError> {
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
    hyper::upgrade::on(&mut res)
        .await
        .map(TokioIo::new)
        .map_err(|source| TunnelError::Http { addr: dial, source })
}

struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(identity: Identity, settings: PoolSettings) -> Self {
        Pool {
            identity,
            settings,
            peers: Mutex::new(HashMap::new()),
        }
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

    /// Opens a tunnel through the peer at `key.dial` to `target`.
    pub async fn tunnel(&self, key: &PeerKey, target: SocketAddr) -> Result<Tunnel, TunnelError> {
        self.sender(key).await?.connect(target).await
    }

    /// Picks the least-loaded live connection, or opens one.
    async fn checkout(
        &self,
        peer: &Peer,
        key: &PeerKey,
    ) -> Result<(SendRequest<Body>, Arc<AtomicUsize>, Option<SpiffeId>), TunnelError> {
        let mut conns = peer.conns.lock().await;
        conns.retain(|c| !c.send.is_closed());
        let best = conns
            .iter()
            .min_by_key(|c| c.streams.load(Ordering::Relaxed));
        if let Some(c) = best {
            let load = c.streams.load(Ordering::Relaxed);
            if load < STREAMS_PER_CONN || conns.len() >= MAX_CONNS_PER_PEER {
                c.streams.fetch_add(1, Ordering::Relaxed);
                return Ok((c.send.clone(), c.streams.clone(), c.peer.clone()));
            }
        }
        let (send, peer_id) = self.open(key).await?;
        let streams = Arc::new(AtomicUsize::new(1));
        conns.push(Conn {
            send: send.clone(),
            streams: streams.clone(),
            peer: peer_id.clone(),
        });
        Ok((send, streams, peer_id))
    }

    /// TCP connect, mTLS handshake and HTTP/2 handshake to a peer proxy.
    async fn open(
        &self,
        key: &PeerKey,
    ) -> Result<(SendRequest<Body>, Option<SpiffeId>), TunnelError> {
        let s = self.settings;
        let tcp = socket::connect(key.dial, s.connect_timeout, s.keepalive).await?;
        let config = self.identity.client_config(key.identity.as_ref());
        let name = ServerName::IpAddress(key.dial.ip().into());
        let tls = tokio::time::timeout(
            s.handshake_timeout,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| TunnelError::HandshakeTimeout {
            addr: key.dial,
            timeout: s.handshake_timeout,
        })?
        .map_err(|e| TunnelError::Handshake {
            addr: key.dial,
            reason: e.to_string(),
        })?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(MESH_ALPN) {
            return Err(TunnelError::NotMesh { addr: key.dial });
        }
        let peer_id = self.identity.peer_id(session);
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| TunnelError::Http {
                addr: key.dial,
                source,
            })?;
        let dial = key.dial;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(peer = %dial, error = %e, "connection to peer proxy ended");
            }
        });
        debug!(peer = %dial, id = ?peer_id, "opened mesh connection");
        Ok((send, peer_id))
    }

    /// Connections currently open, for metrics and tests.
    pub fn open_connections(&self) -> usize {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .values()
            .map(|p| p.conns.try_lock().map(|c| c.len()).unwrap_or(0))
            .sum()
    }
}
