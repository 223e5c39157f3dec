//! Inbound HTTP: requests for the local application, from a peer proxy
//! over the mesh or from a client outside it, forwarded to the application
//! with the HTTP version the client spoke.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use legate_config::SpiffeId;
use tokio::net::TcpStream;
use tracing::debug;

use super::client::FixedConnector;
use super::h1::AnswerFields;
use super::outbound::{finish_upgrade, proxy_answer, ClientSide};
use super::{absolute_uri, authority, boxed, empty, strip_hop_by_hop, upgrade_token};
use super::{host_fault, only_chunked, BODY_UNREADABLE, FOREIGN_CODING, MAX_FIELDS_KEY};
use super::{remove_client_id, CLIENT_ID_HEADER, DECLINED_HEADER, PROTO_HEADER, TARGET_HEADER};
use crate::detect::Protocol;
use crate::h2server::Tunnel;
use crate::inbound::app_targets;
use crate::metrics::{Direction, RouteStats};
use crate::pool::Body;
use crate::relay::relay;
use crate::telemetry::conn::{ConnMeter, Metered};
use crate::telemetry::request::{Observation, Seen};
use crate::Shared;

/// A verified peer proxy, with the identity header for its requests
/// encoded once per connection rather than once per request.
#[derive(Clone)]
pub(crate) struct Peer {
    pub id: SpiffeId,
    header: Option<HeaderValue>,
}

impl Peer {
    pub fn new(id: SpiffeId) -> Self {
        let header = HeaderValue::from_str(id.as_str()).ok();
        Peer { id, header }
    }
}

fn response_to_client(res: Response<Body>) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body)
}

/// An answer on its way: the state of one request, boxed once per request
/// and owning only what the request still needs.
pub(crate) type Answering = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// An answer made at once.
pub(crate) fn answered(res: Response<Body>) -> Answering {
    Box::pin(std::future::ready(res))
}

/// What happens once the answer is known: the request is recorded in the
/// metrics, the access log and the trace, and the answer is shaped for
/// the request (see [`super::Asked::shape`]).
struct Record {
    ctx: Arc<Shared>,
    obs: Observation,
    seen: Seen,
    asked: super::Asked,
}

impl Record {
    /// Starts observing the request `parts` are the head of.
    fn start(
        ctx: &Arc<Shared>,
        parts: &mut http::request::Parts,
        client: SocketAddr,
        dst: SocketAddr,
        seen: Seen,
    ) -> Record {
        let obs = Observation::start(ctx, Direction::Inbound, parts, client, dst);
        Record {
            ctx: ctx.clone(),
            obs,
            seen,
            asked: super::Asked::of(parts),
        }
    }

    fn finish(self, res: Response<Body>) -> Response<Body> {
        let res = self.obs.finish(&self.ctx, res, self.seen);
        self.asked.shape(res)
    }
}

/// The failure of a request to the application, over either protocol.
trait AppError: std::fmt::Display {
    /// Whether no connection could be made.
    fn is_connect(&self) -> bool;

    /// Whether the application refused the request unseen (HTTP/2 only).
    fn is_refused(&self) -> bool {
        false
    }

    /// Whether the request's own body broke off on its way from the
    /// client: the client's fault, not the application's.
    fn is_request_body(&self) -> bool {
        false
    }
}

impl AppError for super::h1::Error {
    fn is_connect(&self) -> bool {
        super::h1::Error::is_connect(self)
    }

    fn is_request_body(&self) -> bool {
        matches!(
            self,
            super::h1::Error::Body(_) | super::h1::Error::BodyLength(_)
        )
    }
}

impl AppError for super::h2c::Error {
    fn is_connect(&self) -> bool {
        super::h2c::Error::is_connect(self)
    }

    fn is_refused(&self) -> bool {
        matches!(self, super::h2c::Error::Http(e) if crate::h2stream::refused(e))
    }
}

pin_project_lite::pin_project! {
    /// A request sent to the application, and what to do with its answer.
    /// Written out rather than as an `async` block, which would hold the
    /// sending future twice over (once captured, once awaited).
    struct Forwarded<F> {
        #[pin]
        sent: F,
        then: Option<(Record, u16, bool)>,
    }
}

impl<F, E> Future for Forwarded<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: AppError,
{
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        let this = self.project();
        let sent = ready!(this.sent.poll(cx));
        let Some((record, port, grpc)) = this.then.take() else {
            panic!("a forwarded request was polled after it completed");
        };
        let res = match sent {
            Ok(res) => response_to_client(res),
            Err(e) if e.is_refused() => {
                // Not an error of the application's: it is closing the
                // connection (GOAWAY) or at its stream limit, and never saw
                // the request. A peer proxy gets the stream refused in
                // turn, and its client's proxy may send it again; a client
                // outside the mesh gets a 503 it may retry.
                debug!(port, error = %e, "the application refused the request unseen");
                let mut res = crate::policy::proxy_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application_refused",
                    grpc,
                );
                res.extensions_mut().insert(crate::h2server::Refuse);
                res
            }
            Err(e) if e.is_request_body() => {
                debug!(port, error = %e, "the client's request body broke off");
                crate::policy::proxy_answer(StatusCode::BAD_REQUEST, BODY_UNREADABLE, grpc)
            }
            Err(e) => {
                debug!(port, error = %e, "request to the application failed");
                let reason = if e.is_connect() {
                    "application_connect_failed"
                } else {
                    "application_error"
                };
                crate::policy::proxy_answer(StatusCode::BAD_GATEWAY, reason, grpc)
            }
        };
        Poll::Ready(record.finish(res))
    }
}

/// Sends an HTTP/1.1 upgrade or `CONNECT` request on a new connection; returns the
/// server's answer, of up to `max_fields` header fields, and its side of
/// the upgrade.
pub(crate) async fn upgrade_direct(
    connector: &FixedConnector,
    req: Request<Body>,
    max_fields: usize,
) -> Result<(Response<Incoming>, OnUpgrade), Response<Body>> {
    let tcp = connector
        .dial()
        .await
        .map_err(|_| proxy_answer(StatusCode::BAD_GATEWAY, "connect_failed"))?;
    let (mut send, conn) = super::http1_client(max_fields)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| proxy_answer(StatusCode::BAD_GATEWAY, "upstream_error"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upgrade connection ended");
        }
    });
    let mut res = send.send_request(req).await.map_err(|e| {
        if e.is_parse_too_large() {
            debug!(
                error = %e, max_header_fields = max_fields,
                "the answer to an upgrade request has more header fields than {MAX_FIELDS_KEY} \
                 allows, or is over hyper's limits on size; answering 502"
            );
        } else {
            debug!(error = %e, "an upgrade request got no answer");
        }
        proxy_answer(StatusCode::BAD_GATEWAY, "upstream_error")
    })?;
    let upgrade = hyper::upgrade::on(&mut res);
    Ok((res, upgrade))
}

/// Forwards a request to the application, speaking `h2` or HTTP/1.x, the
/// latter's answer allowed the header fields `fields` allows. The request
/// is made ready here, before the returned future exists, so that the
/// future holds only the exchange.
fn forward(
    record: Record,
    mut parts: http::request::Parts,
    body: Body,
    ip: IpAddr,
    port: u16,
    h2: bool,
    fields: AnswerFields,
) -> Answering {
    let grpc = crate::policy::is_grpc(&parts.headers);
    let answer = |status, reason| crate::policy::proxy_answer(status, reason, grpc);
    // HTTP/1.1 to the application needs only the path and a Host header:
    // one the client sent is passed on as it is, without a parse or a new
    // URI, unless the request named its target in absolute form, whose
    // authority replaces it (RFC 9112 §3.2.2). HTTP/2 needs the URI
    // absolute.
    if h2 || parts.uri.authority().is_some() || !parts.headers.contains_key(header::HOST) {
        let Some(auth) =
            authority(&parts).or_else(|| SocketAddr::new(ip, port).to_string().parse().ok())
        else {
            return answered(record.finish(answer(
                StatusCode::BAD_REQUEST,
                "request has no usable Host",
            )));
        };
        if absolute_uri(&mut parts, &auth).is_err() {
            return answered(record.finish(answer(
                StatusCode::BAD_REQUEST,
                "request target is not a valid URI",
            )));
        }
        if h2 {
            parts.headers.remove(header::HOST);
        } else if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    // The HTTP/1.1 client writes its own request line; the version field
    // matters only to h2.
    if h2 {
        parts.version = Version::HTTP_2;
    }
    let targets = app_targets(&record.ctx.config, ip, port);
    let req = Request::from_parts(parts, body);
    if h2 {
        Box::pin(Forwarded {
            sent: record.ctx.clients().http2().send(targets, req),
            then: Some((record, port, grpc)),
        })
    } else {
        Box::pin(Forwarded {
            sent: record.ctx.clients().http1().send(targets, req, fields),
            then: Some((record, port, grpc)),
        })
    }
}

/// An HTTP request a peer proxy sent over the mesh. `port` is the
/// application port it is for, already authorized for `peer`; the
/// application's answer may have `max_fields` header fields.
pub(crate) fn from_peer(
    ctx: &Arc<Shared>,
    req: Request<Body>,
    client: SocketAddr,
    dst: SocketAddr,
    port: u16,
    peer: &Peer,
    max_fields: usize,
) -> Answering {
    let (mut parts, body) = req.into_parts();
    let seen = Seen {
        route: Some(ctx.metrics.port(port)),
        peer: Some(peer.id.clone()),
        ..Seen::default()
    };
    let record = Record::start(ctx, &mut parts, client, dst, seen);
    let h2 = parts
        .headers
        .get(PROTO_HEADER)
        .is_none_or(|v| v.as_bytes() == b"h2");
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(TARGET_HEADER);
    parts.headers.remove(PROTO_HEADER);
    // Replaces any copy the client sent.
    remove_client_id(&mut parts.headers);
    if let Some(v) = &peer.header {
        parts.headers.insert(CLIENT_ID_HEADER, v.clone());
    }
    // Only an extended CONNECT (an upgrade carried across) has one.
    let protocol = parts.extensions.remove::<h2::ext::Protocol>();
    match protocol {
        Some(protocol) if parts.method == http::Method::CONNECT => Box::pin(async move {
            let app = SocketAddr::new(dst.ip(), port);
            let res = upgrade_from_peer(&record.ctx, parts, protocol, app, max_fields).await;
            record.finish(res)
        }),
        // The answer goes back to the client's proxy as HTTP/2 headers.
        _ => {
            let fields = AnswerFields::crossing_mesh(max_fields);
            forward(record, parts, body, dst.ip(), port, h2, fields)
        }
    }
}

/// An HTTP/1.1 upgrade carried over the mesh as an extended CONNECT:
/// restored as the HTTP/1.1 request it was, sent on a connection of its
/// own, and joined to the mesh stream once the application accepts.
async fn upgrade_from_peer(
    ctx: &Arc<Shared>,
    mut parts: http::request::Parts,
    protocol: h2::ext::Protocol,
    app: SocketAddr,
    max_fields: usize,
) -> Response<Body> {
    let (ip, port) = (app.ip(), app.port());
    let Some(auth) = authority(&parts) else {
        return proxy_answer(StatusCode::BAD_REQUEST, "upgrade request has no authority");
    };
    parts.method = http::Method::GET;
    parts.version = Version::HTTP_11;
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    let token = HeaderValue::from_str(protocol.as_str())
        .unwrap_or_else(|_| HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, token);
    if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
        parts.headers.insert(header::HOST, v);
    }
    let connector = FixedConnector::new(app_targets(&ctx.config, ip, port), ctx.clients().dial());
    match upgrade_direct(&connector, Request::from_parts(parts, empty()), max_fields).await {
        Ok((res, to_app)) => {
            if res.status() != StatusCode::SWITCHING_PROTOCOLS {
                let mut res = response_to_client(res.map(boxed));
                res.headers_mut()
                    .insert(DECLINED_HEADER, HeaderValue::from_static("1"));
                return res;
            }
            // Over HTTP/2 an accepted extended CONNECT is a 200.
            let (mut head, _) = res.into_parts();
            strip_hop_by_hop(&mut head.headers);
            // The application's copy would make the tunnel's answer look
            // declined.
            head.headers.remove(DECLINED_HEADER);
            head.status = StatusCode::OK;
            let idle = ctx.config.proxy.idle_timeout;
            head.extensions
                .insert(Tunnel::new(move |stream| async move {
                    match to_app.await {
                        Ok(app) => {
                            if let Err(e) = relay(stream, TokioIo::new(app), idle).await {
                                debug!(port, error = %e, "upgraded connection ended");
                            }
                        }
                        Err(e) => {
                            debug!(port, error = %e, "the application's side of the upgrade failed")
                        }
                    }
                }));
            Response::from_parts(head, empty())
        }
        Err(answer) => answer,
    }
}

/// A request served here from its HTTP/1.x or HTTP/2 connection: one from
/// a client outside the mesh (`peer` is `None`), or one a peer proxy sent
/// inside a tunnel.
fn from_client(
    ctx: &Arc<Shared>,
    route: &Arc<RouteStats>,
    req: Request<Incoming>,
    client: SocketAddr,
    dst: SocketAddr,
    peer: Option<&Peer>,
    max_fields: usize,
) -> Answering {
    let (mut parts, body) = req.into_parts();
    let seen = Seen {
        route: Some(route.clone()),
        peer: peer.map(|p| p.id.clone()),
        ..Seen::default()
    };
    let record = Record::start(ctx, &mut parts, client, dst, seen);
    let mut req = Request::from_parts(parts, body);
    if let Some(fault) = host_fault(&req) {
        return answered(record.finish(proxy_answer(StatusCode::BAD_REQUEST, fault)));
    }
    // Replaces any copy the client sent.
    remove_client_id(req.headers_mut());
    if let Some(v) = peer.and_then(|p| p.header.as_ref()) {
        req.headers_mut().insert(CLIENT_ID_HEADER, v.clone());
    }
    req.headers_mut().remove(TARGET_HEADER);
    req.headers_mut().remove(PROTO_HEADER);
    // A tunnel asked of an application that is itself an HTTP proxy (see
    // `crate::detect::Side`), joined like an upgrade once it says yes.
    let connect = req.method() == http::Method::CONNECT && req.version() != Version::HTTP_2;
    if connect || upgrade_token(&req).is_some() {
        let from_client = ClientSide::of(&mut req);
        let (parts, body) = req.into_parts();
        return Box::pin(async move {
            let ctx = &record.ctx;
            let connector = FixedConnector::new(
                app_targets(&ctx.config, dst.ip(), dst.port()),
                ctx.clients().dial(),
            );
            let req = Request::from_parts(parts, boxed(body));
            let res = match upgrade_direct(&connector, req, max_fields).await {
                Ok((res, to_app)) => finish_upgrade(
                    res,
                    from_client,
                    to_app,
                    ctx.config.proxy.idle_timeout,
                    connect,
                ),
                Err(answer) => answer,
            };
            record.finish(res)
        });
    }
    let h2 = req.version() == Version::HTTP_2;
    if !h2
        && !hyper::body::Body::is_end_stream(req.body())
        && only_chunked(req.headers()) == Some(false)
    {
        let grpc = crate::policy::is_grpc(req.headers());
        let refused =
            crate::policy::proxy_answer(StatusCode::NOT_IMPLEMENTED, FOREIGN_CODING, grpc);
        return answered(record.finish(refused));
    }
    // What described the client's connection to this proxy is not the
    // application's to see, as over the mesh (RFC 9110 §7.6.1).
    strip_hop_by_hop(req.headers_mut());
    let (parts, body) = req.into_parts();
    // The answer goes back on the connection the request came on: to a
    // client outside the mesh, or as bytes inside a peer's tunnel.
    let fields = AnswerFields::direct(max_fields);
    forward(record, parts, boxed(body), dst.ip(), dst.port(), h2, fields)
}

/// Serves an HTTP connection from a client outside the mesh. The identity
/// header is removed: only a verified mesh peer may set who it is.
pub(crate) async fn serve_plain(
    ctx: Arc<Shared>,
    sock: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    meter: Arc<ConnMeter>,
) {
    serve(ctx, Metered::new(sock, meter), client, dst, proto, None).await;
}

/// Serves HTTP that a peer proxy sent inside a tunnel to `dst` (a port
/// this proxy does not carry as opaque): as from a client outside the
/// mesh, except that the application is told who the peer is. Whatever a
/// client's proxy carries as opaque, the identity header that the server
/// application receives is the one this proxy verified.
pub(crate) async fn serve_tunnelled<I>(
    ctx: Arc<Shared>,
    io: I,
    client: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    peer: Peer,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve(ctx, io, client, dst, proto, Some(peer)).await;
}

async fn serve<I>(
    ctx: Arc<Shared>,
    io: I,
    client: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    peer: Option<Peer>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = ctx.clone();
    let route = ctx.metrics.port(dst.port());
    let h2 = proto == Protocol::Http2;
    // Read once per connection: a reload applies to the next one.
    let max_fields = super::max_fields(&ctx.live_now().config);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let answering = from_client(
            &svc_ctx,
            &route,
            req,
            client,
            dst,
            peer.as_ref(),
            max_fields,
        );
        async move {
            let res = answering.await;
            if h2 && res.extensions().get::<crate::h2server::Refuse>().is_some() {
                // hyper resets the stream with this reason, and the client
                // may send the request again, as the application's own
                // refusal would have let it.
                return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
            }
            Ok(res)
        }
    });
    let io = TokioIo::new(io);
    let served = match proto {
        Protocol::Http2 => {
            crate::serve_draining!(
                ctx,
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(crate::pool::MAX_HEADER_LIST)
                    .serve_connection(io, svc)
            )
        }
        _ => {
            crate::serve_draining!(
                ctx,
                super::http1_server(max_fields)
                    .timer(TokioTimer::new())
                    // A client that half-closes after its request still
                    // gets the answer (as on the outbound side).
                    .half_close(true)
                    .serve_connection(io, svc)
                    .with_upgrades()
            )
        }
    };
    match served {
        Err(e) if !h2 && e.is_parse_too_large() => {
            // hyper has answered 431 itself; only this line can say why.
            debug!(
                %client, %dst, error = %e, max_header_fields = max_fields,
                "refused a client's request head: more header fields than {MAX_FIELDS_KEY} \
                 allows (431), or over hyper's limits on size"
            );
        }
        Err(e) => debug!(%client, error = %e, "inbound HTTP connection ended"),
        Ok(()) => {}
    }
}
