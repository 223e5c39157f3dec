//! Outbound HTTP: requests from the local application, forwarded to the
//! destination's proxy over the mesh or straight to a destination outside
//! it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::future::{Either, FutureExt as _, TryFutureExt as _};
use http_body_util::BodyExt;
use tokio::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::h1::AnswerFields;
use super::replay::RequestBody;
use super::{absolute_uri, authority, boxed, empty, only_chunked, strip_hop_by_hop};
use super::{host_fault, upgrade_token, Held, BODY_UNREADABLE, DECLINED_HEADER, FOREIGN_CODING};
use super::{MAX_FIELDS_KEY, PROTO_HEADER, TARGET_HEADER};
use crate::batch::Batched;
use crate::detect::Protocol;
use crate::h2stream::{RecvBody, StreamIo};
use crate::http::client::Clients;
use crate::metrics::Direction;
use crate::policy::{self, Failure, LimitKind, Limits, Next, Outcome, Stop};
use crate::pool::{Body, BoxError, Own, PeerKey, Sender, TunnelError};
use crate::relay::relay;
use crate::router::{Route, Router};
use crate::socket::Targets;
use crate::telemetry::conn::{ConnMeter, Metered};
use crate::telemetry::request::{Observation, Seen};
use crate::{Live, Shared};

/// Serves the application's HTTP connection until it closes.
pub(crate) async fn serve(
    ctx: Arc<Shared>,
    app: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    meter: Arc<ConnMeter>,
) {
    // Read once per connection: a reload applies to the next one.
    let max_fields = super::max_fields(&ctx.live_now().config);
    let conn = Arc::new(AppConn {
        target: header_value(dst),
        own: tokio::sync::Mutex::new(None),
        max_fields,
    });
    let answer = {
        let (ctx, meter) = (ctx.clone(), meter.clone());
        move |req| Answered {
            inner: handle(ctx.clone(), req, client, dst, conn.clone(), meter.clone()),
        }
    };
    let io = Metered::new(app, meter);
    let served = match proto {
        Protocol::Http2 => {
            // Each stream's answer comes from its own task: batched, the
            // answers finished in one round leave in one write instead of
            // a system call each.
            crate::serve_draining!(
                ctx,
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    // What the mesh carries, not hyper's 16 KiB.
                    .max_header_list_size(crate::pool::MAX_HEADER_LIST)
                    .serve_connection(
                        TokioIo::new(Batched::new(io)),
                        // Boxed: each stream's request runs in a task of
                        // its own, and tokio moves a task's future by value
                        // when it starts and ends it; a future of several
                        // kilobytes inline cost a few large copies per
                        // request, a box costs one allocation.
                        hyper::service::service_fn(move |req| Box::pin(answer(req))),
                    )
            )
        }
        _ => {
            let io = TokioIo::new(io);
            crate::serve_draining!(
                ctx,
                super::http1_server(max_fields)
                    .timer(TokioTimer::new())
                    // The client is the local application: how long it
                    // keeps a connection between requests is its own
                    // choice, as without the proxy, and a timer per
                    // request cost every request an allocation.
                    .header_read_timeout(None)
                    // An application that half-closes after its request
                    // still wants the answer, as it would get it without
                    // the proxy. Not reading for the end of the stream
                    // while a request is in flight also lets hyper reuse
                    // its read buffer: a read then found it still shared
                    // with the request's headers and took a new 8 KiB one
                    // for every request.
                    .half_close(true)
                    // Not boxed: hyper keeps the request's future in one
                    // place per connection, allocated once, where a box
                    // cost every request an allocation of several
                    // kilobytes.
                    .serve_connection(io, hyper::service::service_fn(answer))
                    .with_upgrades()
            )
        }
    };
    match served {
        Err(e) if proto != Protocol::Http2 && e.is_parse_too_large() => {
            // hyper has answered 431 itself; only this line can say why.
            debug!(
                %client, %dst, error = %e, max_header_fields = max_fields,
                "refused the application's request head: more header fields than \
                 {MAX_FIELDS_KEY} allows (431), or over hyper's limits on size"
            );
        }
        Err(e) => debug!(%client, %dst, error = %e, "outbound HTTP connection ended"),
        Ok(()) => {}
    }
}

pin_project_lite::pin_project! {
    /// A request's answer in the `Result` shape hyper's services return.
    /// Not an async block around `handle`: the block would keep its own
    /// copy of the request's arguments beside the future holding them, and
    /// both are copied into place for every request.
    struct Answered<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future<Output = Response<Body>>> Future for Answered<F> {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map(Ok)
    }
}

/// What the requests of one application connection share.
struct AppConn {
    /// The destination, as every request names it to the peer proxy:
    /// encoded once.
    target: HeaderValue,
    /// The connection's own mesh connection, for an in-band destination
    /// (see [`crate::pool::Own`]); opened by its first request.
    own: tokio::sync::Mutex<Option<Own>>,
    /// `proxy.http.max_header_fields` when the connection was accepted,
    /// for the answers of servers outside the mesh.
    max_fields: usize,
}

/// An answer the proxy makes itself, for a request that is not gRPC.
pub fn proxy_answer(status: StatusCode, reason: &str) -> Response<Body> {
    policy::proxy_answer(status, reason, false)
}

fn proto_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "h2",
        Version::HTTP_10 => "http/1.0",
        _ => "http/1.1",
    }
}

/// A response body from the peer proxy or from a server outside the mesh.
enum Upstream {
    Mesh(RecvBody),
    Direct(Body),
}

impl hyper::body::Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Upstream::Mesh(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Upstream::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Mesh(b) => b.is_end_stream(),
            Upstream::Direct(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Upstream::Mesh(b) => b.size_hint(),
            Upstream::Direct(b) => b.size_hint(),
        }
    }
}

/// Why one attempt produced no response.
enum AttemptError {
    /// A failure the retry policy and the breaker judge.
    Failed(Failure),
    /// The proxy will not try at all; this is the answer.
    Answer(Response<Body>),
}

/// A stream to the destination's proxy, or `None` when the destination
/// turned out to have none (the request then goes direct).
///
/// Not an async fn: the route is known at once, and the future then holds
/// only what getting a stream needs, not a second copy of the arguments;
/// it is part of every request's future.
fn mesh_sender<'a>(
    ctx: &'a Arc<Shared>,
    router: &'a Arc<Router>,
    dst: SocketAddr,
    conn: &'a AppConn,
    grpc: bool,
) -> impl Future<Output = Result<Option<Sender>, AttemptError>> + 'a {
    let (key, probe, renew) = match router.route(dst) {
        Route::Mesh { key, probe, renew } => (key, probe, renew),
        Route::Passthrough => return Either::Left(std::future::ready(Ok(None))),
        Route::Recheck(key) => {
            crate::router::recheck(ctx.clone(), router.clone(), key);
            return Either::Left(std::future::ready(Ok(None)));
        }
    };
    Either::Right(async move {
        let cfg = &ctx.config.proxy;
        if !ctx.identity.is_ready()
            && tokio::time::timeout(cfg.handshake_timeout, ctx.identity.ready())
                .await
                .is_err()
        {
            warn!(%dst, "no workload certificate yet; refusing instead of sending plaintext");
            return Err(AttemptError::Answer(policy::proxy_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_certificate",
                grpc,
            )));
        }
        let sender = if key.in_band(dst) {
            own_sender(ctx, &key, conn).await
        } else {
            ctx.pool().sender(&key).await
        };
        match sender {
            Ok(s) => {
                if probe || renew {
                    router.learn(dst.ip(), true);
                }
                Ok(Some(s))
            }
            Err(e) if probe && e.unanswered() => {
                router.learn(dst.ip(), false);
                Ok(None)
            }
            Err(e) => {
                // A peer known to be meshed stays so while it does not answer
                // (see `crate::router`): the request fails, never goes plaintext.
                warn!(%dst, reason = e.reason(), error = %e, "mesh connection failed");
                Err(AttemptError::Failed(Failure::Connect))
            }
        }
    })
}

/// A stream on the application connection's own mesh connection, opening
/// it (again, once it has ended) if need be.
async fn own_sender(ctx: &Shared, key: &PeerKey, conn: &AppConn) -> Result<Sender, TunnelError> {
    let mut own = conn.own.lock().await;
    if let Some(sender) = own.as_ref().and_then(Own::sender) {
        return Ok(sender);
    }
    let opened = ctx.pool().own(key).await?;
    let sender = opened
        .sender()
        .ok_or(TunnelError::Closed { addr: key.dial })?;
    *own = Some(opened);
    Ok(sender)
}

/// One attempt: over the mesh or direct, failing as the given timeout at
/// `deadline`. Records in `seen` how the request was carried.
///
/// Every request's attempt is created and then moved whole into its
/// caller's future, so it is kept small. Not an async fn, which would keep
/// its arguments beside the future that consumes them. The way the request
/// travels is chosen first, and the future that sends it then takes the
/// space the choice had: it is the choosing future's outcome, not awaited
/// within it, where everything the choice had kept (the request's head
/// among it) would have stayed beside it. A local that future borrows
/// keeps its space to the end of its scope, which is why [`carried`] and
/// [`to_peer`] are functions of their own.
#[allow(clippy::too_many_arguments)]
fn attempt<'a>(
    ctx: &'a Arc<Shared>,
    router: &'a Arc<Router>,
    dst: SocketAddr,
    conn: &'a AppConn,
    parts: http::request::Parts,
    body: Body,
    limits: &'a Arc<Limits>,
    deadline: Option<(Instant, Failure)>,
    grpc: bool,
    seen: &'a mut Seen,
) -> Bounded<impl Future<Output = Result<Response<Upstream>, AttemptError>> + 'a> {
    let send = async move {
        let pending = limits.acquire(LimitKind::Pending).map_err(|e| {
            if let Some(r) = &seen.route {
                r.limit_rejected(e.kind);
            }
            AttemptError::Answer(e.answer(grpc))
        })?;
        let sender = mesh_sender(ctx, router, dst, conn, grpc).await?;
        drop(pending);
        let sending = match carried(seen, sender) {
            Some(sender) => Either::Left(over_mesh(sender, to_peer(parts, body, conn), dst)),
            None => Either::Right(direct(
                ctx.clients(),
                Request::from_parts(parts, body),
                dst,
                conn.max_fields,
            )),
        };
        Ok(sending.map_err(AttemptError::Failed))
    }
    .try_flatten();
    match deadline {
        Some((t, timeout)) => Bounded::Within {
            attempt: tokio::time::timeout_at(t, send),
            timeout,
        },
        None => Bounded::Free { attempt: send },
    }
}

pin_project_lite::pin_project! {
    /// An attempt, failing as `timeout` at its deadline when it has one:
    /// the choice [`attempt`] makes without awaiting either.
    #[project = BoundedProj]
    enum Bounded<F> {
        Within {
            #[pin]
            attempt: tokio::time::Timeout<F>,
            timeout: Failure,
        },
        Free {
            #[pin]
            attempt: F,
        },
    }
}

impl<F> Future for Bounded<F>
where
    F: Future<Output = Result<Response<Upstream>, AttemptError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BoundedProj::Within { attempt, timeout } => match ready!(attempt.poll(cx)) {
                Ok(result) => Poll::Ready(result),
                Err(_elapsed) => Poll::Ready(Err(AttemptError::Failed(*timeout))),
            },
            BoundedProj::Free { attempt } => attempt.poll(cx),
        }
    }
}

/// Records in `seen` how the request is carried: over the mesh, with
/// `sender`, or directly.
fn carried(seen: &mut Seen, sender: Option<Sender>) -> Option<Sender> {
    seen.peer = sender.as_ref().and_then(|s| s.peer.clone());
    seen.carried = Some(seen.peer.clone());
    sender
}

/// The request as it crosses the mesh: the destination and the
/// application's protocol named in headers of the mesh's own.
fn to_peer(mut parts: http::request::Parts, body: Body, conn: &AppConn) -> Request<Body> {
    let app_version = parts.version;
    if parts.uri.authority().is_some() {
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
    }
    // Otherwise an origin-form HTTP/1.x request: h2 sends it
    // with `:scheme: http`, no `:authority` and its Host header.
    parts.headers.insert(TARGET_HEADER, conn.target.clone());
    parts.headers.insert(
        PROTO_HEADER,
        HeaderValue::from_static(proto_name(app_version)),
    );
    Request::from_parts(parts, body)
}

/// The request sent on `sender`, its failure judged.
fn over_mesh(
    sender: Sender,
    req: Request<Body>,
    dst: SocketAddr,
) -> impl Future<Output = Result<Response<Upstream>, Failure>> {
    sender.send(req).map(move |sent| match sent {
        Ok(res) => Ok(res.map(Upstream::Mesh)),
        Err(e) => {
            debug!(%dst, error = %e, "request over the mesh failed");
            let refused =
                matches!(&e, TunnelError::Http { source, .. } if crate::h2stream::refused(source));
            Err(if refused {
                Failure::RefusedStream
            } else {
                Failure::Reset
            })
        }
    })
}

/// The request sent straight to `dst`, which has no proxy, in the
/// application's version of HTTP; its failure judged.
fn direct(
    clients: &Clients,
    req: Request<Body>,
    dst: SocketAddr,
    max_fields: usize,
) -> impl Future<Output = Result<Response<Upstream>, Failure>> {
    let sent = if req.version() == Version::HTTP_2 {
        Either::Left(clients.http2().send(Targets::one(dst), req).map(|sent| {
            sent.map_err(|e| (e.is_connect(), crate::h2stream::refused(&e), e.to_string()))
        }))
    } else {
        // Straight back to the application over HTTP/1.1: no mesh hop
        // bounds the answer's header list.
        let fields = AnswerFields::direct(max_fields);
        Either::Right(
            clients
                .http1()
                .send(Targets::one(dst), req, fields)
                .map(|sent| sent.map_err(|e| (e.is_connect(), false, e.to_string()))),
        )
    };
    sent.map(move |sent| {
        sent.map(|res| res.map(Upstream::Direct))
            .map_err(|(connect, refused, e)| {
                debug!(%dst, error = %e, "direct request failed");
                if connect {
                    Failure::Connect
                } else if refused {
                    Failure::RefusedStream
                } else {
                    Failure::Reset
                }
            })
    })
}

/// One request from the application: observed (metrics, span, access
/// log) around [`route_request`].
///
/// Not an async fn, which would keep a second copy of its arguments, the
/// request among them: hyper holds this future for each request and moves
/// it whole.
#[allow(clippy::manual_async_fn)]
fn handle(
    ctx: Arc<Shared>,
    req: Request<Incoming>,
    client: SocketAddr,
    dst: SocketAddr,
    conn: Arc<AppConn>,
    meter: Arc<ConnMeter>,
) -> impl Future<Output = Response<Body>> {
    async move {
        // The observation starts when the request is first polled, which
        // is when its latency starts to count. The head is taken apart and
        // put back in a function of its own: a head this future borrowed
        // would keep its space for as long as the request lasts.
        let (req, asked, obs) = observe(&ctx, req, client, dst);
        let mut seen = Seen::default();
        let res = route_request(&ctx, req, dst, &conn, &mut seen).await;
        if let Some(peer) = &seen.carried {
            meter.set_peer(peer.as_ref());
        }
        asked.shape(obs.finish(&ctx, res, seen))
    }
}

/// Starts observing the request: what [`handle`] needs to finish it.
fn observe(
    ctx: &Shared,
    req: Request<Incoming>,
    client: SocketAddr,
    dst: SocketAddr,
) -> (Request<Incoming>, super::Asked, Observation) {
    let (mut parts, body) = req.into_parts();
    let asked = super::Asked::of(&parts);
    let obs = Observation::start(ctx, Direction::Outbound, &mut parts, client, dst);
    (Request::from_parts(parts, body), asked, obs)
}

/// Where the request goes: answered at once, upgraded, or forwarded.
///
/// Not an async fn: it would keep the request, and its arguments, beside
/// the forwarding future that takes them over, and each request's future
/// is moved whole into [`handle`]'s. What can be judged at once is judged
/// before the forwarding future exists, which then owns only what the
/// attempts need.
fn route_request<'a>(
    ctx: &'a Arc<Shared>,
    req: Request<Incoming>,
    dst: SocketAddr,
    conn: &'a AppConn,
    seen: &'a mut Seen,
) -> Routed<impl Future<Output = Response<Body>> + 'a, impl Future<Output = Response<Body>> + 'a> {
    if let Some(fault) = host_fault(&req) {
        return Routed::answer(proxy_answer(StatusCode::BAD_REQUEST, fault));
    }
    let live = ctx.live();
    if let Some(token) = upgrade_token(&req) {
        // Boxed so that the common path does not carry its space.
        return Routed::Upgrade {
            upgrade: Box::pin(upgrade(ctx.clone(), live, req, dst, conn, token, seen)),
        };
    }
    let grpc = policy::is_grpc(req.headers());
    if !hyper::body::Body::is_end_stream(req.body())
        && req.version() < Version::HTTP_2
        && only_chunked(req.headers()) == Some(false)
    {
        return Routed::answer(policy::proxy_answer(
            StatusCode::NOT_IMPLEMENTED,
            FOREIGN_CODING,
            grpc,
        ));
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(TARGET_HEADER);
    parts.headers.remove(PROTO_HEADER);
    // An HTTP/1.x request in origin form names its authority in Host
    // alone, and crosses the mesh so: Host as a header, no `:authority`
    // (the form h2 has for requests forwarded from HTTP/1.x). The peer
    // proxy restores HTTP/1.1 without parsing or rebuilding anything, and
    // the server application receives the Host header byte for byte, as
    // it would without the proxy. Every other request is made absolute,
    // its authority taken from the URI, the Host header or, failing both,
    // the original destination.
    let origin_form = parts.version != Version::HTTP_2
        && parts.uri.authority().is_none()
        && parts.headers.contains_key(header::HOST);
    if !origin_form {
        let Some(auth) = authority(&parts).or_else(|| dst.to_string().parse().ok()) else {
            return Routed::answer(policy::proxy_answer(
                StatusCode::BAD_REQUEST,
                "request has no usable Host",
                grpc,
            ));
        };
        if absolute_uri(&mut parts, &auth).is_err() {
            return Routed::answer(policy::proxy_answer(
                StatusCode::BAD_REQUEST,
                "request target is not a valid URI",
                grpc,
            ));
        }
    }
    Routed::Forward {
        forward: forward(ctx, live, parts, body, dst, conn, grpc, seen),
    }
}

pin_project_lite::pin_project! {
    /// What [`route_request`] decided, as one future.
    #[project = RoutedProj]
    enum Routed<U, F> {
        Answer { answer: Option<Response<Body>> },
        Upgrade {
            #[pin]
            upgrade: U,
        },
        Forward {
            #[pin]
            forward: F,
        },
    }
}

impl<U, F> Routed<U, F> {
    fn answer(answer: Response<Body>) -> Self {
        Routed::Answer {
            answer: Some(answer),
        }
    }
}

impl<U, F> Future for Routed<U, F>
where
    U: Future<Output = Response<Body>>,
    F: Future<Output = Response<Body>>,
{
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RoutedProj::Answer { answer } => match answer.take() {
                Some(answer) => Poll::Ready(answer),
                None => panic!("a request's answer was awaited again after it had come"),
            },
            RoutedProj::Upgrade { upgrade } => upgrade.poll(cx),
            RoutedProj::Forward { forward } => forward.poll(cx),
        }
    }
}

/// Forwards a request, over the mesh or direct, with the retries its
/// policy allows. Not an async fn, which would keep a second copy of its
/// arguments, the request's head among them, for as long as the request
/// lasts.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn forward<'a>(
    ctx: &'a Arc<Shared>,
    live: Arc<Live>,
    mut parts: http::request::Parts,
    body: Incoming,
    dst: SocketAddr,
    conn: &'a AppConn,
    grpc: bool,
    seen: &'a mut Seen,
) -> impl Future<Output = Response<Body>> + 'a {
    async move {
        // The authority the request was made absolute with, or the Host
        // of one in origin form.
        let host = match parts.uri.authority() {
            Some(a) => Some(a.as_str()),
            None => parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok()),
        };
        let policy = live.policies.policy_for(dst, host);
        seen.route = live.route_stats(policy.name());
        let dest = policy.destination(dst);
        let in_flight = match dest.limits.acquire(LimitKind::InFlight) {
            Ok(g) => g,
            Err(e) => {
                if let Some(r) = &seen.route {
                    r.limit_rejected(e.kind);
                }
                return e.answer(grpc);
            }
        };
        let may_retry = policy.retry.attempts > 1 && policy::retry::can_replay(&parts.method, true);
        let mut body = match RequestBody::read(body, &parts.headers, policy.retry_buffer, may_retry)
            .await
        {
            Ok(b) => b,
            Err(()) => return policy::proxy_answer(StatusCode::BAD_REQUEST, BODY_UNREADABLE, grpc),
        };
        // The clock is read once per attempt and once per outcome, and each
        // reading serves everything that needs the time then: the budget, the
        // breaker, the timeouts and the request's latency.
        let mut now = Instant::now();
        let mut retries = policy.retries_at(&dest, &parts.method, now);
        loop {
            let permit = match policy.breakers.admit_at(dst, now) {
                Ok(p) => p,
                Err(e) => {
                    if let Some(r) = &seen.route {
                        r.breaker_refused();
                    }
                    return e.answer(grpc);
                }
            };
            let deadline = retries.attempt_timeout(now).map(|(t, f)| (now + t, f));
            let result = attempt(
                ctx,
                &live.router,
                dst,
                conn,
                attempt_parts(&mut parts),
                body.attempt(),
                &dest.limits,
                deadline,
                grpc,
                seen,
            )
            .await;
            now = Instant::now();
            seen.answered = Some(now);
            if matches!(result, Err(AttemptError::Failed(_))) && body.client_failed() {
                // The application's own body broke off (bad chunked framing,
                // or a client gone mid-upload): the destination is not to
                // blame, so its breaker does not count it and nothing is
                // retried. A client still there learns what was wrong.
                drop(permit);
                debug!(%dst, "the application's request body broke off");
                return policy::proxy_answer(StatusCode::BAD_REQUEST, BODY_UNREADABLE, grpc);
            }
            if let Err(AttemptError::Failed(f)) = result {
                if f.is_timeout() && body.still_arriving() {
                    // Time ran out while the proxy was still passing on the
                    // application's upload: a slow uploader and a slow server
                    // look the same from here, so the destination's breaker
                    // does not count it. Part of the body is gone, so it
                    // cannot be retried either.
                    drop(permit);
                    debug!(%dst, "timed out while the request body was still arriving");
                    return f.answer(grpc);
                }
            }
            let outcome = match &result {
                Ok(res) => Outcome::response(res.status(), res.headers()),
                Err(AttemptError::Failed(f)) => Outcome::Failed(*f),
                Err(AttemptError::Answer(_)) => {
                    drop(permit);
                    let Err(AttemptError::Answer(answer)) = result else {
                        unreachable!()
                    };
                    return answer;
                }
            };
            permit.record_outcome(&outcome, now);
            match retries.next(&outcome, body.is_replayable(), now) {
                Next::Retry(delay) => {
                    if let Some(r) = &seen.route {
                        r.retried();
                    }
                    seen.retries += 1;
                    debug!(%dst, attempt = retries.attempts(), ?outcome, ?delay, "retrying");
                    drop(result);
                    // Whatever answers next, it is not this attempt.
                    seen.answered = None;
                    tokio::time::sleep(delay).await;
                    now = Instant::now();
                }
                Next::Stop(stop) => {
                    if let Some(r) = &seen.route {
                        match stop {
                            Stop::BudgetExhausted => r.budget_exhausted(),
                            Stop::Final if retries.attempts() > 1 => r.retry_succeeded(),
                            _ => {}
                        }
                    }
                    if retries.attempts() > 1 {
                        debug!(%dst, attempts = retries.attempts(), stop = stop.as_str(), "retries ended");
                    }
                    return match result {
                        Ok(res) => {
                            let (mut head, body) = res.into_parts();
                            strip_hop_by_hop(&mut head.headers);
                            head.headers.remove(TARGET_HEADER);
                            // One box for both: `Held` wraps the upstream body itself.
                            Response::from_parts(head, Held::new(body, in_flight).boxed())
                        }
                        Err(AttemptError::Failed(f)) => f.answer(grpc),
                        Err(AttemptError::Answer(a)) => a,
                    };
                }
            }
        }
    }
}

/// A copy of the request head for one attempt, its header map sized for
/// the two headers the mesh adds: a clone has no room to spare, and adding
/// them reallocated every attempt's map.
fn attempt_parts(parts: &mut http::request::Parts) -> http::request::Parts {
    let headers = std::mem::take(&mut parts.headers);
    let mut copy = parts.clone();
    let mut map = HeaderMap::with_capacity(headers.len() + 2);
    map.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    parts.headers = headers;
    copy.headers = map;
    copy
}

fn header_value(addr: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&addr.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An HTTP/1.1 `Upgrade` request: answered `101` and turned into a byte
/// tunnel once the server agrees.
async fn upgrade(
    ctx: Arc<Shared>,
    live: Arc<Live>,
    mut req: Request<Incoming>,
    dst: SocketAddr,
    conn: &AppConn,
    token: HeaderValue,
    seen: &mut Seen,
) -> Response<Body> {
    let from_app = ClientSide::of(&mut req);
    let idle = ctx.config.proxy.idle_timeout;
    let sender = match mesh_sender(&ctx, &live.router, dst, conn, false).await {
        Ok(s) => s,
        Err(AttemptError::Failed(f)) => return f.answer(false),
        Err(AttemptError::Answer(answer)) => return answer,
    };
    seen.peer = sender.as_ref().and_then(|s| s.peer.clone());
    seen.carried = Some(seen.peer.clone());
    let Some(sender) = sender else {
        let connector =
            crate::http::client::FixedConnector::new(Targets::one(dst), ctx.clients().dial());
        let (parts, body) = req.into_parts();
        return match super::inbound::upgrade_direct(
            &connector,
            Request::from_parts(parts, boxed(body)),
            conn.max_fields,
        )
        .await
        {
            Ok((res, to_server)) => finish_upgrade(res, from_app, to_server, idle, false),
            Err(answer) => answer,
        };
    };
    let (mut parts, _) = req.into_parts();
    let Some(auth) = authority(&parts).or_else(|| dst.to_string().parse().ok()) else {
        return proxy_answer(StatusCode::BAD_REQUEST, "request has no usable Host");
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    if absolute_uri(&mut parts, &auth).is_err() {
        return proxy_answer(StatusCode::BAD_REQUEST, "request target is not a valid URI");
    }
    let Ok(protocol) = token.to_str() else {
        return proxy_answer(StatusCode::BAD_REQUEST, "Upgrade header is not text");
    };
    parts.method = http::Method::CONNECT;
    parts.version = Version::HTTP_2;
    parts.extensions.insert(h2::ext::Protocol::from(protocol));
    parts.headers.insert(TARGET_HEADER, header_value(dst));
    parts
        .headers
        .insert(PROTO_HEADER, HeaderValue::from_static("http/1.1"));
    let (res, stream) = match sender.exchange(Request::from_parts(parts, ())).await {
        Ok(r) => r,
        Err(e) => return proxy_answer(StatusCode::BAD_GATEWAY, e.reason()),
    };
    let (mut head, recv) = res.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if head.headers.remove(DECLINED_HEADER).is_some() || head.status != StatusCode::OK {
        // The server declined the upgrade: its answer goes back as it is,
        // and the client's connection goes on as HTTP/1.1.
        let body = RecvBody::new(recv, &head.headers);
        return Response::from_parts(head, body.map_err(BoxError::from).boxed());
    }
    head.status = StatusCode::SWITCHING_PROTOCOLS;
    head.headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    head.headers.insert(header::UPGRADE, token);
    let tunnel = StreamIo::new(stream, recv);
    let from_app = from_app.switched();
    tokio::spawn(async move {
        match from_app.await {
            Ok(app) => {
                if let Err(e) = relay(TokioIo::new(app), tunnel, idle).await {
                    debug!(error = %e, "upgraded connection ended");
                }
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    Response::from_parts(head, empty())
}

/// Answers the client with the server's `101`, or its 2xx to a `CONNECT`
/// (`connect`), and joins the two connections once both are ready. Any
/// other answer goes back as it is, and the client's connection goes on
/// as HTTP/1.1.
pub(crate) fn finish_upgrade(
    res: Response<Incoming>,
    from_client: ClientSide,
    to_server: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
    connect: bool,
) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    let switched = if connect {
        parts.status.is_success()
    } else {
        parts.status == StatusCode::SWITCHING_PROTOCOLS
    };
    if !switched {
        strip_hop_by_hop(&mut parts.headers);
        return Response::from_parts(parts, boxed(body));
    }
    if connect {
        // The tunnel follows the head at once: a 2xx to CONNECT has no
        // content (RFC 9110 §9.3.6), and its hop-by-hop fields described
        // the server's connection, not the client's.
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    join_upgrades(from_client.switched(), to_server, idle);
    Response::from_parts(parts, empty())
}

/// The client's side of an upgrade (or `CONNECT`) it asked for, however
/// the request ends.
///
/// hyper never forgets an upgrade a client asked for, even when it did not
/// happen (the server declined it, or the proxy answered itself) and the
/// connection went on as HTTP/1.1: when that connection ends, hyper hands
/// it over as if upgraded instead of closing it. Dropped then, a
/// connection inside a mesh tunnel would reset its stream and lose the end
/// of the last answer still queued on it. So unless it is taken for a
/// tunnel ([`Self::switched`]), this side, once dropped, waits for the
/// hand-over and shuts the connection down gracefully. A later upgrade
/// request on the same connection takes hyper's expectation over, and
/// that wait then ends at once.
pub(crate) struct ClientSide(Option<hyper::upgrade::OnUpgrade>);

impl ClientSide {
    /// The client's side of `req`'s upgrade.
    pub(crate) fn of<B>(req: &mut Request<B>) -> Self {
        ClientSide(Some(hyper::upgrade::on(req)))
    }

    /// The side, for a tunnel: the upgrade happens.
    fn switched(mut self) -> hyper::upgrade::OnUpgrade {
        self.0.take().expect("a client's side is taken only once")
    }
}

impl Drop for ClientSide {
    fn drop(&mut self) {
        let Some(on) = self.0.take() else {
            return;
        };
        // Outside a runtime (it is shutting down) there is nothing to
        // wait with, and the connection goes with it anyway.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Ok(io) = on.await {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut TokioIo::new(io)).await;
            }
        });
    }
}

/// Relays between two connections once both have switched protocols.
pub(crate) fn join_upgrades(
    a: hyper::upgrade::OnUpgrade,
    b: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
) {
    tokio::spawn(async move {
        match tokio::try_join!(a, b) {
            Ok((a, b)) => {
                if let Err(e) = relay(TokioIo::new(a), TokioIo::new(b), idle).await {
                    debug!(error = %e, "upgraded connection ended");
                }
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, G, F: Future>(_: fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_requests_future_stays_small() {
        // hyper moves each HTTP/1.1 request's future into its connection's
        // state, and each HTTP/2 stream's into a task allocated for it:
        // every byte of it is copied for every request. Nested async fns
        // that kept their arguments twice once made it 4.3 KB, and the
        // send on a mesh stream 1.2 KB of it.
        let size = future_size(handle);
        assert!(
            size <= 2304,
            "a request's future is {size} bytes: box or flatten what made it grow"
        );
        let sending = std::mem::size_of::<crate::pool::Sending>();
        assert!(
            sending <= 512,
            "a send on a mesh stream is {sending} bytes: it holds more than the head"
        );
    }

    #[test]
    fn an_attempts_head_is_the_request_head_with_room_for_the_mesh_headers() {
        let req = Request::post("/orders?id=7")
            .header(header::HOST, "shop.example")
            .header("x-tag", "a")
            .header("x-tag", "b")
            .header(header::CONTENT_LENGTH, "3")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        parts.extensions.insert(7u32);
        let copy = attempt_parts(&mut parts);

        assert_eq!(copy.method, parts.method);
        assert_eq!(copy.uri, parts.uri);
        assert_eq!(copy.version, parts.version);
        assert_eq!(copy.extensions.get::<u32>(), Some(&7));
        assert_eq!(copy.headers, parts.headers, "every value, repeats in order");
        let tags: Vec<_> = copy.headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
        assert!(copy.headers.capacity() >= copy.headers.len() + 2);
        // The original keeps its headers for the next attempt.
        assert_eq!(parts.headers.len(), 4);
    }
}
