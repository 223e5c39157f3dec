//! Outbound HTTP: requests from the local application, forwarded to the
//! destination's proxy over the mesh or straight to a destination outside
//! it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{absolute_uri, authority, boxed, empty, full, strip_hop_by_hop, upgrade_token};
use super::{ERROR_HEADER, PROTO_HEADER, TARGET_HEADER};
use crate::detect::Protocol;
use crate::pool::{Body, Sender, TunnelError};
use crate::relay::relay;
use crate::router::Route;
use crate::Shared;

/// Serves the application's HTTP connection until it closes.
pub(crate) async fn serve(
    ctx: Arc<Shared>,
    app: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
) {
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req| {
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req, dst).await) }
    });
    let io = TokioIo::new(app);
    let served = match proto {
        Protocol::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, svc)
                .await
        }
        _ => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = served {
        debug!(%client, %dst, error = %e, "outbound HTTP connection ended");
    }
}

/// An answer the proxy makes itself.
pub fn proxy_answer(status: StatusCode, reason: &str) -> Response<Body> {
    let mut res = Response::new(full(format!("legate: {reason}\n")));
    *res.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(reason) {
        res.headers_mut().insert(ERROR_HEADER, v);
    }
    res
}

fn proto_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "h2",
        Version::HTTP_10 => "http/1.0",
        _ => "http/1.1",
    }
}

/// The response as the application gets it.
fn to_app(res: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, boxed(body))
}

/// A stream to the destination's proxy, or `None` when the destination
/// turned out to have none (the request then goes direct), or the answer
/// to give the application when the mesh cannot carry the request.
async fn mesh_sender(ctx: &Shared, dst: SocketAddr) -> Result<Option<Sender>, Response<Body>> {
    let Route::Mesh { key, probe } = ctx.router.route(dst) else {
        return Ok(None);
    };
    let cfg = &ctx.config.proxy;
    if !ctx.identity.is_ready()
        && tokio::time::timeout(cfg.handshake_timeout, ctx.identity.ready())
            .await
            .is_err()
    {
        warn!(%dst, "no workload certificate yet; refusing instead of sending plaintext");
        return Err(proxy_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "no workload certificate yet",
        ));
    }
    match ctx.pool.sender(&key).await {
        Ok(s) => {
            if probe {
                ctx.router.learn(dst.ip(), true);
            }
            Ok(Some(s))
        }
        Err(TunnelError::Connect(_)) if probe => {
            ctx.router.learn(dst.ip(), false);
            Ok(None)
        }
        Err(e) => {
            if matches!(e, TunnelError::Connect(_)) {
                ctx.router.forget(dst.ip());
            }
            warn!(%dst, reason = e.reason(), error = %e, "mesh connection failed");
            Err(proxy_answer(StatusCode::BAD_GATEWAY, e.reason()))
        }
    }
}

async fn handle(ctx: Arc<Shared>, req: Request<Incoming>, dst: SocketAddr) -> Response<Body> {
    if let Some(token) = upgrade_token(&req) {
        return upgrade(ctx, req, dst, token).await;
    }
    let version = req.version();
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(TARGET_HEADER);
    parts.headers.remove(PROTO_HEADER);
    let Some(auth) = authority(&parts).or_else(|| dst.to_string().parse().ok()) else {
        return proxy_answer(StatusCode::BAD_REQUEST, "request has no usable Host");
    };
    if absolute_uri(&mut parts, &auth).is_err() {
        return proxy_answer(StatusCode::BAD_REQUEST, "request target is not a valid URI");
    }
    let body = boxed(body);
    let sender = match mesh_sender(&ctx, dst).await {
        Ok(s) => s,
        Err(answer) => return answer,
    };
    match sender {
        Some(sender) => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            parts.headers.insert(TARGET_HEADER, header_value(dst));
            parts
                .headers
                .insert(PROTO_HEADER, HeaderValue::from_static(proto_name(version)));
            match sender.send(Request::from_parts(parts, body)).await {
                Ok(res) => to_app(res),
                Err(e) => {
                    debug!(%dst, error = %e, "request over the mesh failed");
                    proxy_answer(StatusCode::BAD_GATEWAY, e.reason())
                }
            }
        }
        None => {
            let client = ctx.clients.get(&[dst], version == Version::HTTP_2);
            match client.request(Request::from_parts(parts, body)).await {
                Ok(res) => to_app(res),
                Err(e) => {
                    debug!(%dst, error = %e, "direct request failed");
                    let reason = if e.is_connect() {
                        "connect_failed"
                    } else {
                        "upstream_error"
                    };
                    proxy_answer(StatusCode::BAD_GATEWAY, reason)
                }
            }
        }
    }
}

fn header_value(addr: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&addr.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An HTTP/1.1 `Upgrade` request: answered `101` and turned into a byte
/// tunnel once the server agrees.
async fn upgrade(
    ctx: Arc<Shared>,
    mut req: Request<Incoming>,
    dst: SocketAddr,
    token: HeaderValue,
) -> Response<Body> {
    let from_app = hyper::upgrade::on(&mut req);
    let idle = ctx.config.proxy.idle_timeout;
    let sender = match mesh_sender(&ctx, dst).await {
        Ok(s) => s,
        Err(answer) => return answer,
    };
    let Some(sender) = sender else {
        let connector = crate::http::client::FixedConnector::new(
            vec![dst],
            ctx.config.proxy.connect_timeout,
            ctx.config.proxy.tcp_keepalive,
        );
        let (parts, body) = req.into_parts();
        return match super::inbound::upgrade_direct(
            &connector,
            Request::from_parts(parts, boxed(body)),
        )
        .await
        {
            Ok((res, to_server)) => finish_upgrade(res, from_app, to_server, idle),
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
    parts
        .extensions
        .insert(hyper::ext::Protocol::from(protocol));
    parts.headers.insert(TARGET_HEADER, header_value(dst));
    parts
        .headers
        .insert(PROTO_HEADER, HeaderValue::from_static("http/1.1"));
    let res = match sender.send(Request::from_parts(parts, empty())).await {
        Ok(res) => res,
        Err(e) => return proxy_answer(StatusCode::BAD_GATEWAY, e.reason()),
    };
    if res.status() != StatusCode::OK {
        // The server declined the upgrade: its answer goes back as it is.
        return to_app(res);
    }
    let (mut head, body) = res.into_parts();
    let tunnel = hyper::upgrade::on(Response::from_parts(head.clone(), body));
    strip_hop_by_hop(&mut head.headers);
    head.status = StatusCode::SWITCHING_PROTOCOLS;
    head.headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    head.headers.insert(header::UPGRADE, token);
    join_upgrades(from_app, tunnel, idle);
    Response::from_parts(head, empty())
}

/// Answers the application with the server's `101` and joins the two
/// upgraded connections once both are ready.
pub(crate) fn finish_upgrade(
    res: Response<Incoming>,
    from_client: hyper::upgrade::OnUpgrade,
    to_server: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
) -> Response<Body> {
    let (parts, body) = res.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        let mut parts = parts;
        strip_hop_by_hop(&mut parts.headers);
        return Response::from_parts(parts, boxed(body));
    }
    join_upgrades(from_client, to_server, idle);
    Response::from_parts(parts, empty())
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
