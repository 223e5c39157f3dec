//! HTTP/2 with prior knowledge from a proxy to a server that is not a peer
//! proxy (the application behind the server's proxy, or a destination
//! outside the mesh), on the h2 crate.
//!
//! As with the mesh pool ([`crate::pool`]), driving h2 directly spares each
//! request what hyper's client adds around it: a dispatch channel into a
//! connection task and a oneshot back for the answer. The request's own
//! task opens the stream, sends the body and reads the answer. One
//! connection per application address set and worker carries every stream,
//! as hyper's client did; once it fails or the application sends GOAWAY,
//! the next request opens another. A connection no request has used for
//! an idle period ([`super::h1::IDLE_TIMEOUT`], as for HTTP/1.1) is let
//! go: streams still open on it finish, and h2 then closes it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tracing::debug;

use crate::h2stream::{self, RecvBody};
use crate::pool::{self, Body};
use crate::socket::{ConnectError, Dial, Targets};

/// More distinct address sets than this and the connections are dropped
/// from the map (streams on them finish; the connections close after).
const MAX_TARGETS: usize = 1024;

/// Why a request to the application got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP/2 with the application failed: {0}")]
    Http(#[from] h2::Error),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }
}

/// HTTP/2 connections to the application, one per address set; one pool
/// per worker thread, like the other clients.
pub struct Pool {
    conns: Mutex<foldhash::HashMap<Targets, Arc<Slot>>>,
    dial: Dial,
    idle: Duration,
}

/// Held while a connection is chosen or opened, so a burst of requests
/// opens one connection rather than one each.
#[derive(Default)]
struct Slot(tokio::sync::Mutex<Option<Conn>>);

#[derive(Clone)]
struct Conn {
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Set when the connection's task ends.
    closed: AtomicBool,
    /// Set by every request; the connection's task clears it once per idle
    /// period and lets the connection go when it finds it clear.
    used: AtomicBool,
}

impl Pool {
    pub fn new(dial: Dial) -> Self {
        Self::with_idle(dial, super::h1::IDLE_TIMEOUT)
    }

    fn with_idle(dial: Dial, idle: Duration) -> Self {
        Pool {
            conns: Mutex::new(foldhash::HashMap::default()),
            dial,
            idle,
        }
    }

    /// Sends `req` (whose URI carries scheme and authority, as HTTP/2
    /// wants) and returns the answer once its head has arrived.
    ///
    /// As in [`super::h1::Pool::send`], what can be done at once is done
    /// before the future exists, which then owns only what sending needs.
    pub fn send(
        &self,
        targets: Targets,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + Send + 'static {
        let (mut head, body) = req.into_parts();
        pool::set_content_length(&mut head, &body);
        let end = body.is_end_stream();
        let slot = self.slot(targets);
        let (dial, idle) = (self.dial, self.idle);
        async move {
            let mut conn = connection(&slot, &dial, &idle, &targets).await?;
            let ready = std::future::poll_fn(|cx| conn.send.poll_ready(cx)).await;
            if ended(&conn, ready) {
                // The connection ended since it was last used (the
                // application restarted, or sent GOAWAY). Nothing of this
                // request was sent, so it goes on a new connection.
                conn = connection(&slot, &dial, &idle, &targets).await?;
                std::future::poll_fn(|cx| conn.send.poll_ready(cx)).await?;
            }
            conn.state.used.store(true, Ordering::Relaxed);
            let (response, stream) = conn.send.send_request(Request::from_parts(head, ()), end)?;
            if !end {
                h2stream::start_body(body, stream).await;
            }
            let (head, recv) = response.await?.into_parts();
            let body = RecvBody::new(recv, &head.headers);
            Ok(Response::from_parts(head, body.map_err(Into::into).boxed()))
        }
    }

    /// Where the connection to `targets` is kept.
    fn slot(&self, targets: Targets) -> Arc<Slot> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() >= MAX_TARGETS && !conns.contains_key(&targets) {
            conns.clear();
        }
        conns.entry(targets).or_default().clone()
    }
}

/// Whether `conn`, which was to take the request, has ended instead
/// (`ready` failed); if so, it is marked so.
///
/// Not in the request's future: the error, borrowed there to be logged,
/// would keep its space in every request's future to the end.
fn ended(conn: &Conn, ready: Result<(), h2::Error>) -> bool {
    let Err(e) = ready else {
        return false;
    };
    debug!(error = %e, "connection to the application ended; opening another");
    conn.state.closed.store(true, Ordering::Release);
    true
}

/// The live connection in `slot`, or a new one to `targets`.
///
/// Not an async fn, and taking references: an async fn keeps a copy of
/// its arguments beside them, and its future is part of every request's.
#[allow(clippy::manual_async_fn)]
fn connection<'a>(
    slot: &'a Arc<Slot>,
    dial: &'a Dial,
    idle: &'a Duration,
    targets: &'a Targets,
) -> impl Future<Output = Result<Conn, Error>> + 'a {
    async move {
        let mut current = slot.0.lock().await;
        if let Some(c) = current
            .as_ref()
            .filter(|c| !c.state.closed.load(Ordering::Acquire))
        {
            return Ok(c.clone());
        }
        // Boxed: dialling and the handshake make a large future that nearly
        // every request, finding a connection, would otherwise carry.
        let conn = Box::pin(open(*dial, *targets, Arc::downgrade(slot), *idle)).await?;
        *current = Some(conn.clone());
        Ok(conn)
    }
}

async fn open(
    dial: Dial,
    targets: Targets,
    slot: Weak<Slot>,
    idle: Duration,
) -> Result<Conn, Error> {
    let tcp = dial.connect(&targets).await?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(pool::STREAM_WINDOW)
        .initial_connection_window_size(pool::CONN_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(tcp)
        .await?;
    let state = Arc::new(ConnState::default());
    let watched = state.clone();
    tokio::spawn(async move {
        tokio::pin!(conn);
        let unused = async {
            // Each request sets `used`: a whole period with none, and the
            // connection is idle.
            loop {
                tokio::time::sleep(idle).await;
                if !watched.used.swap(false, Ordering::Relaxed) {
                    break;
                }
            }
        };
        let ended = tokio::select! {
            biased;
            ended = &mut conn => Some(ended),
            () = unused => None,
        };
        let ended = match ended {
            Some(ended) => ended,
            None => {
                // Out of the slot, the pool's handle to the connection is
                // dropped; once the streams still open finish and no
                // request holds a handle, h2 closes the connection.
                if let Some(slot) = slot.upgrade() {
                    let mut current = slot.0.lock().await;
                    if current
                        .as_ref()
                        .is_some_and(|c| Arc::ptr_eq(&c.state, &watched))
                    {
                        *current = None;
                    }
                }
                debug!("idle HTTP/2 connection to the application let go");
                conn.await
            }
        };
        if let Err(e) = ended {
            debug!(error = %e, "HTTP/2 connection to the application ended");
        }
        watched.closed.store(true, Ordering::Release);
    });
    Ok(Conn { send, state })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;

    use super::*;

    /// Connections an application accepted, and of those how many ended.
    #[derive(Clone, Default)]
    struct Conns {
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
    }

    /// An HTTP/2 application that answers with the request body;
    /// `drop_after` connections are cut after one request each.
    async fn app(drop_after: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let (addr, conns) = slow_app(drop_after, Duration::ZERO).await;
        (addr, conns.accepted)
    }

    /// [`app`], answering `delay` after each request's body has arrived.
    async fn slow_app(drop_after: usize, delay: Duration) -> (std::net::SocketAddr, Conns) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns = Conns::default();
        let (count, ended) = (conns.accepted.clone(), conns.ended.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let ended = ended.clone();
                let served = Arc::new(tokio::sync::Notify::new());
                let done = served.clone();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let done = done.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        tokio::time::sleep(delay).await;
                        done.notify_one();
                        Ok::<_, Infallible>(Response::new(Full::new(body.unwrap_or_default())))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc);
                tokio::spawn(async move {
                    if n < drop_after {
                        tokio::select! {
                            _ = conn => {}
                            _ = async {
                                served.notified().await;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            } => {}
                        }
                    } else {
                        let _ = conn.await;
                    }
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, conns)
    }

    fn post(body: &'static str) -> Request<Body> {
        Request::post("http://app/echo")
            .body(
                Full::new(Bytes::from_static(body.as_bytes()))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .expect("request")
    }

    fn idle_pool(idle: Duration) -> Pool {
        Pool::with_idle(
            Dial {
                timeout: Duration::from_secs(2),
                keepalive: Duration::from_secs(60),
            },
            idle,
        )
    }

    async fn echo(pool: &Pool, addr: std::net::SocketAddr, body: &'static str) {
        let res = pool
            .send(Targets::one(addr), post(body))
            .await
            .expect("answer");
        let got = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(got, body);
    }

    /// Sends three requests, `pause` apart; returns the connections the
    /// application accepted.
    async fn three_echoes(drop_after: usize, pause: Duration) -> usize {
        let (addr, accepted) = app(drop_after).await;
        let pool = idle_pool(crate::http::h1::IDLE_TIMEOUT);
        for body in ["one", "two", "three"] {
            echo(&pool, addr, body).await;
            tokio::time::sleep(pause).await;
        }
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn requests_share_one_connection_and_bodies_cross_both_ways() {
        assert_eq!(three_echoes(0, Duration::ZERO).await, 1);
    }

    #[tokio::test]
    async fn a_connection_the_application_closed_is_replaced() {
        assert_eq!(three_echoes(2, Duration::from_millis(100)).await, 3);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_busy_one_kept() {
        let (addr, conns) = slow_app(0, Duration::ZERO).await;
        let pool = idle_pool(Duration::from_millis(100));
        // A request every 40 ms keeps the one connection in use.
        for _ in 0..10 {
            echo(&pool, addr, "busy").await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(conns.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(conns.ended.load(Ordering::SeqCst), 0);
        // Two idle periods without a request: the connection is closed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(conns.ended.load(Ordering::SeqCst), 1, "closed when idle");
        echo(&pool, addr, "again").await;
        assert_eq!(conns.accepted.load(Ordering::SeqCst), 2, "a new one after");
    }

    #[tokio::test]
    async fn a_stream_in_flight_outlives_its_idle_connection() {
        // The answer takes three idle periods; no other request comes.
        let (addr, conns) = slow_app(0, Duration::from_millis(300)).await;
        let pool = idle_pool(Duration::from_millis(100));
        echo(&pool, addr, "slow").await;
        assert_eq!(conns.accepted.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            conns.ended.load(Ordering::SeqCst),
            1,
            "closed once its stream ended"
        );
    }

    #[tokio::test]
    async fn nobody_listening_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = idle_pool(crate::http::h1::IDLE_TIMEOUT);
        let err = pool
            .send(Targets::one(addr), post("x"))
            .await
            .expect_err("refused");
        assert!(err.is_connect(), "{err}");
    }
}
