//! The HTTP/2 server for connections from peer proxies, on the `h2` crate
//! directly.
//!
//! Each stream is answered inside its connection's task. A generic server
//! spawns a task per stream, and that task wakes the connection's task to
//! send each answer; here a stream's future sits in a set the connection's
//! task polls, so a request costs neither a task nor a wakeup across tasks.
//! The set is polled before the connection, so the frames a pass queues
//! are written by the same pass.
//!
//! A tunnel (a `CONNECT`, plain or extended) leaves the set once its answer
//! is sent and relays in a task of its own: it lives as long as the
//! connection it carries, and its bytes have nothing to share with the
//! requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{header, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::h2stream::{BodyPipe, RecvBody, StreamIo};
use crate::http::inbound::Answering;
use crate::http::DECLINED_HEADER;
use crate::pool::{Body, CONN_WINDOW, MAX_FRAME, MAX_HEADER_LIST, STREAM_WINDOW};

/// Streams one peer proxy may have open on a connection.
const MAX_STREAMS: u32 = 1024;

/// What a tunnel does with its stream once the answer is sent: relays it
/// to the application, in a task of its own.
type Relay = Box<dyn FnOnce(StreamIo) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Marks a 2xx answer to a `CONNECT` as a tunnel and says where its bytes
/// go. It travels in the answer's extensions, which must be `Clone`; only
/// one clone ever takes the relay.
#[derive(Clone)]
pub(crate) struct Tunnel(Arc<Mutex<Option<Relay>>>);

impl Tunnel {
    pub fn new<F, R>(relay: F) -> Self
    where
        F: FnOnce(StreamIo) -> R + Send + 'static,
        R: Future<Output = ()> + Send + 'static,
    {
        let relay: Relay = Box::new(move |stream| Box::pin(relay(stream)));
        Tunnel(Arc::new(Mutex::new(Some(relay))))
    }

    fn take(&self) -> Option<Relay> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Marks an answer that is to reach the peer as a `REFUSED_STREAM` reset
/// instead: the request was refused unseen further on, and the reset tells
/// the peer proxy so, which may then send it again (an answer would be
/// taken for the server's).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refuse;

/// Why a connection ended other than by closing cleanly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Ended {
    #[error("HTTP/2: {0}")]
    Http(#[from] h2::Error),
    #[error("no HTTP/2 preface within {0:?} of the handshake")]
    Preface(Duration),
    #[error("{0}")]
    KeepAlive(String),
}

fn builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        // A larger head gets a 431 from h2.
        .max_header_list_size(MAX_HEADER_LIST)
        // h2 closes a connection on which more than 20 streams were reset
        // before the server took them up (a guard against the "rapid
        // reset" flood). Between proxies that is ordinary: an application
        // that drops many requests at once (wrk ending a run, a client
        // timing out a burst) makes its proxy cancel all those streams, and
        // the GOAWAY would then fail every other request on the pooled
        // connection. The peer is authenticated, and the count stays
        // bounded by the streams it may open.
        .max_pending_accept_reset_streams(MAX_STREAMS as usize)
        .enable_connect_protocol();
    b
}

/// Serves one connection from a peer proxy until it closes, `drained`
/// resolves and its streams finish, or a keep-alive ping goes unanswered
/// for `silence`. `patience` bounds the wait for the HTTP/2 preface.
/// `answer` makes each request's answer; a `CONNECT` reaches it with an
/// empty body, its stream being the tunnel.
pub(crate) async fn serve<T, D, A>(
    io: T,
    patience: Duration,
    silence: Duration,
    drained: D,
    mut answer: A,
) -> Result<(), Ended>
where
    T: AsyncRead + AsyncWrite + Unpin,
    D: Future<Output = ()>,
    A: FnMut(Request<Body>) -> Answering,
{
    let mut conn = tokio::time::timeout(patience, builder().handshake::<_, Bytes>(io))
        .await
        .map_err(|_| Ended::Preface(patience))??;
    let keep_alive = crate::pool::keep_alive(conn.ping_pong(), silence);
    tokio::pin!(keep_alive, drained);
    let mut draining = false;
    let mut streams = FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        if !draining && drained.as_mut().poll(cx).is_ready() {
            draining = true;
            conn.graceful_shutdown();
        }
        if let Poll::Ready(why) = keep_alive.as_mut().poll(cx) {
            return Poll::Ready(Err(Ended::KeepAlive(why)));
        }
        loop {
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    streams.push(Exchange::new(req, respond, &mut answer));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// One stream: its answer on the way, then its response body.
enum Exchange {
    Answering {
        answering: Answering,
        respond: SendResponse<Bytes>,
        /// A `CONNECT`'s stream, kept for the tunnel.
        tunnel: Option<RecvStream>,
    },
    Body(BodyPipe),
    Done,
}

impl Exchange {
    fn new<A>(req: Request<RecvStream>, respond: SendResponse<Bytes>, answer: &mut A) -> Self
    where
        A: FnMut(Request<Body>) -> Answering,
    {
        let (parts, recv) = req.into_parts();
        let (body, tunnel) = if parts.method == http::Method::CONNECT {
            (crate::http::empty(), Some(recv))
        } else if recv.is_end_stream() {
            // No body (a GET, say): an empty one needs no allocation.
            (crate::http::empty(), None)
        } else {
            (
                RecvBody::new(recv, &parts.headers)
                    .map_err(Into::into)
                    .boxed(),
                None,
            )
        };
        let answering = answer(Request::from_parts(parts, body));
        Exchange::Answering {
            answering,
            respond,
            tunnel,
        }
    }
}

impl Future for Exchange {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let res = match this {
            Exchange::Body(pipe) => return Pin::new(pipe).poll(cx),
            Exchange::Done => return Poll::Ready(()),
            Exchange::Answering {
                answering, respond, ..
            } => match answering.as_mut().poll(cx) {
                Poll::Ready(res) => res,
                Poll::Pending => {
                    // The peer cancelled: dropping the answer's future
                    // cancels the request to the application with it.
                    if respond.poll_reset(cx).is_ready() {
                        *this = Exchange::Done;
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            },
        };
        let Exchange::Answering {
            mut respond,
            tunnel,
            ..
        } = std::mem::replace(this, Exchange::Done)
        else {
            return Poll::Ready(());
        };
        let (mut head, body) = res.into_parts();
        if head.extensions.get::<Refuse>().is_some() {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            return Poll::Ready(());
        }
        if let Some(recv) = tunnel {
            // An upgrade the application declined is answered as it was,
            // 2xx included: the marker tells the peer it is no tunnel.
            if head.status.is_success() && !head.headers.contains_key(DECLINED_HEADER) {
                let Some(relay) = head.extensions.remove::<Tunnel>().and_then(|t| t.take()) else {
                    debug!("a CONNECT was answered with success but no tunnel; resetting");
                    respond.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                };
                // A 2xx to CONNECT has no body; the stream is the tunnel.
                head.headers.remove(header::CONTENT_LENGTH);
                match respond.send_response(Response::from_parts(head, ()), false) {
                    Ok(send) => {
                        tokio::spawn(relay(StreamIo::new(send, recv)));
                    }
                    Err(e) => debug!(error = %e, "tunnel answer could not be sent"),
                }
                return Poll::Ready(());
            }
        }
        let end = body.is_end_stream();
        if !end {
            // A length known ahead spares the client's proxy chunking the
            // body towards an HTTP/1.1 client.
            if let Some(n) = body.size_hint().exact() {
                if !head.headers.contains_key(header::CONTENT_LENGTH) {
                    head.headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
            }
        }
        match respond.send_response(Response::from_parts(head, ()), end) {
            Ok(send) if !end => {
                let mut pipe = BodyPipe::new(body, send);
                let polled = Pin::new(&mut pipe).poll(cx);
                if polled.is_pending() {
                    *this = Exchange::Body(pipe);
                }
                polled
            }
            Ok(_) => Poll::Ready(()),
            Err(e) => {
                debug!(error = %e, "answer could not be sent to the peer proxy");
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::inbound::answered;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering with `answer`, and a client connected to it.
    async fn pair<A>(
        answer: A,
        drained: tokio::sync::oneshot::Receiver<()>,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), Ended>>,
    )
    where
        A: FnMut(Request<Body>) -> Answering + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let drained = async move {
            let _ = drained.await;
        };
        let server = tokio::spawn(serve(
            server_io,
            Duration::from_secs(5),
            Duration::from_secs(10),
            drained,
            answer,
        ));
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .handshake(client_io)
            .await
            .unwrap();
        tokio::spawn(conn);
        (client, server)
    }

    fn get() -> Request<()> {
        Request::get("http://app/").body(()).unwrap()
    }

    async fn body_of(res: Response<RecvStream>) -> Vec<u8> {
        let (head, recv) = res.into_parts();
        let body = RecvBody::new(recv, &head.headers);
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_request_body_is_read_and_the_answer_carries_its_length() {
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let (mut client, _server) = pair(
            |req: Request<Body>| -> Answering {
                Box::pin(async move {
                    let got = req.into_body().collect().await.unwrap().to_bytes();
                    let mut echo = b"got ".to_vec();
                    echo.extend_from_slice(&got);
                    Response::new(crate::http::full(echo))
                })
            },
            rx,
        )
        .await;
        let req = Request::post("http://app/").body(()).unwrap();
        let (res, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"hello"), true).unwrap();
        let res = res.await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(res.headers()[header::CONTENT_LENGTH], "9");
        assert_eq!(body_of(res).await, b"got hello");
    }

    /// Set when the answer's future is dropped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_stream_the_peer_resets_drops_its_answer() {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let (mut client, _server) = pair(
            move |_req| -> Answering {
                let guard = Dropped(flag.clone());
                Box::pin(async move {
                    let _guard = guard;
                    std::future::pending().await
                })
            },
            rx,
        )
        .await;
        let (res, mut send) = client.send_request(get(), false).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the answer is still awaited"
        );
        send.send_reset(h2::Reason::CANCEL);
        drop(res);
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the answer of a reset stream was never dropped");
    }

    #[tokio::test]
    async fn a_connect_answered_with_a_tunnel_relays_both_ways() {
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let (mut client, _server) = pair(
            |req: Request<Body>| -> Answering {
                assert_eq!(req.method(), http::Method::CONNECT);
                let (app, mut far) = tokio::io::duplex(64 * 1024);
                // The application: answers each read with it upper-cased.
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = far.read(&mut buf).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        buf[..n].make_ascii_uppercase();
                        far.write_all(&buf[..n]).await.unwrap();
                    }
                });
                let mut res = Response::new(crate::http::full("ignored"));
                res.extensions_mut()
                    .insert(Tunnel::new(move |stream| async move {
                        let _ = crate::relay::relay(stream, app, Duration::from_secs(60)).await;
                    }));
                answered(res)
            },
            rx,
        )
        .await;
        let req = Request::connect("10.200.0.1:80").body(()).unwrap();
        let (res, send) = client.send_request(req, false).unwrap();
        let res = res.await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert!(res.headers().get(header::CONTENT_LENGTH).is_none());
        let mut io = StreamIo::new(send, res.into_body());
        io.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"PING");
    }

    #[tokio::test]
    async fn a_connect_refused_is_an_ordinary_answer() {
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let (mut client, _server) = pair(
            |_req| {
                answered(crate::policy::proxy_answer(
                    http::StatusCode::BAD_GATEWAY,
                    "no application",
                    false,
                ))
            },
            rx,
        )
        .await;
        let req = Request::connect("10.200.0.1:80").body(()).unwrap();
        let (res, _send) = client.send_request(req, false).unwrap();
        let res = res.await.unwrap();
        assert_eq!(res.status(), http::StatusCode::BAD_GATEWAY);
        assert_eq!(body_of(res).await, b"legate: no application\n");
    }

    /// A peer that cancels a burst of streams the server has not taken up
    /// yet keeps its connection, and the requests after it are served.
    #[tokio::test]
    async fn a_burst_of_cancelled_streams_does_not_close_the_connection() {
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let (mut client, _server) =
            pair(|_req| answered(Response::new(crate::http::empty())), rx).await;
        // Opened and cancelled without yielding, so that the server reads
        // every HEADERS and its RST_STREAM in one go.
        for _ in 0..100 {
            let (response, _) = client.send_request(get(), true).unwrap();
            drop(response);
        }
        tokio::task::yield_now().await;
        for _ in 0..3 {
            let (response, _) = client.send_request(get(), true).unwrap();
            let response = tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .expect("an answer")
                .expect("the connection stays open after the burst");
            assert_eq!(response.status(), http::StatusCode::OK);
        }
    }

    /// Cookies and tokens can make a request head tens of kilobytes; the
    /// application would take it without the mesh, so the mesh must too.
    #[tokio::test]
    async fn a_request_head_of_tens_of_kilobytes_crosses() {
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let (mut client, _server) = pair(
            |req: Request<Body>| {
                let len = req.headers()["x-big"].len();
                answered(Response::new(crate::http::full(len.to_string())))
            },
            rx,
        )
        .await;
        let big = "b".repeat(40 * 1024);
        let req = Request::get("http://app/")
            .header("x-big", big.as_str())
            .body(())
            .unwrap();
        let (res, _) = client.send_request(req, true).unwrap();
        let res = res.await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(body_of(res).await, b"40960");
    }

    #[tokio::test]
    async fn a_peer_that_never_sends_the_preface_is_let_go() {
        let (_client_io, server_io) = tokio::io::duplex(1024);
        let ended = serve(
            server_io,
            Duration::from_millis(50),
            Duration::from_secs(10),
            std::future::pending(),
            |_req| answered(Response::new(crate::http::empty())),
        )
        .await;
        assert!(matches!(ended, Err(Ended::Preface(_))), "{ended:?}");
    }

    #[tokio::test]
    async fn draining_finishes_the_streams_in_flight_then_closes() {
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let mut release = Some(release_rx);
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel();
        let (mut client, server) = pair(
            move |_req| -> Answering {
                let release = release.take();
                Box::pin(async move {
                    if let Some(r) = release {
                        let _ = r.await;
                    }
                    Response::new(crate::http::full("done"))
                })
            },
            drain_rx,
        )
        .await;
        let (slow, _) = client.send_request(get(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!server.is_finished(), "a stream is still in flight");
        release_tx.send(()).unwrap();
        let res = slow.await.unwrap();
        assert_eq!(body_of(res).await, b"done");
        let ended = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the drained connection closes")
            .unwrap();
        assert!(ended.is_ok(), "{ended:?}");
    }
}
