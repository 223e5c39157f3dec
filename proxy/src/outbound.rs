//! The outbound side: connections the application makes, captured by
//! `legate init`'s OUTPUT rules onto `127.0.0.1:15001` and `[::1]:15001`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::detect::{detect_or_silent, late_bytes, settle, Protocol, Settled, Side};
use crate::metrics::{protocol_label, Detected, Direction};
use crate::policy::LimitKind;
use crate::relay::relay;
use crate::router::Route;
use crate::socket;
use crate::telemetry::conn::Metered;
use crate::Shared;

/// Handles one captured outbound connection to the end.
pub(crate) async fn handle(ctx: Arc<Shared>, app: TcpStream, client: SocketAddr) {
    let cfg = &ctx.config.proxy;
    socket::tune(&app, cfg.tcp_keepalive);
    let dst = match socket::original_dst(&app) {
        Ok(dst) => dst,
        Err(e) => {
            warn!(%client, error = %e, "cannot read the original destination (SO_ORIGINAL_DST); was this connection redirected by `legate init`? closing it");
            socket::reset(app);
            return;
        }
    };
    if ctx.is_own_listener(dst) {
        warn!(%client, %dst, "refusing a connection addressed to the proxy's own listener: forwarding it would loop");
        socket::reset(app);
        return;
    }
    let proto = if cfg.opaque_ports.contains(dst.port()) {
        ctx.metrics.detected(Direction::Outbound, Detected::Skipped);
        Some(Protocol::Opaque)
    } else {
        let p = detect_or_silent(&app, Side::Client).await;
        if let Some(p) = p {
            ctx.metrics.detected(Direction::Outbound, p.into());
        }
        p
    };
    let (app, proto) = match proto {
        Some(p @ (Protocol::Http1 | Protocol::Http2)) => (app, p),
        _ => match opaque(&ctx, app, client, dst, proto.is_none()).await {
            Some(spoke) => spoke,
            None => return,
        },
    };
    let meter = ctx.conn_meter(Direction::Outbound, client, dst, protocol_label(proto));
    // Boxed, like every large state a connection reaches on one path only:
    // a connection's task is as large as its largest state, and an opaque
    // connection would otherwise carry HTTP's for its whole life (see
    // `lib.rs`'s `connection`).
    Box::pin(crate::http::outbound::serve(
        ctx, app, client, dst, proto, meter,
    ))
    .await;
}

/// The server end of an opaque connection.
enum Upstream {
    /// Boxed: held beside the relay that takes its stream, it would
    /// otherwise be counted twice in every connection's task.
    Mesh(Box<crate::pool::Tunnel>),
    Plain(TcpStream),
}

/// Proxies an opaque connection, over the mesh or in plaintext. With
/// `silent` (the client said nothing within the detection window) the
/// server is connected first and the connection stays opaque only if the
/// server speaks first; if the client does, and in HTTP, the server
/// connection is dropped unused and the application's connection returned
/// with its protocol, for the HTTP path.
async fn opaque(
    ctx: &Arc<Shared>,
    mut app: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    silent: bool,
) -> Option<(TcpStream, Protocol)> {
    let cfg = &ctx.config.proxy;
    let new_meter = || {
        ctx.conn_meter(
            Direction::Outbound,
            client,
            dst,
            protocol_label(Protocol::Opaque),
        )
    };
    // A client that spoke at once is metered from here, before its server
    // is connected, as every other connection is from its start; a silent
    // one only once it turns out to stay opaque, so that one that turns to
    // HTTP is counted once, as HTTP.
    let early = (!silent).then(new_meter);
    let meter = || early.clone().unwrap_or_else(new_meter);
    let live = ctx.live();
    // Each opaque connection is one connection at the destination (the
    // peer proxy opens one to its application per tunnel), so it counts
    // against the destination's `max_connections` while it lasts.
    let policy = live.policies.policy_for(dst, None);
    let held = match policy
        .destination(dst)
        .limits
        .acquire(LimitKind::Connections)
    {
        Ok(guard) => guard,
        Err(e) => {
            // At the limit nothing more is connected; but a silent client
            // may yet speak HTTP, which needs no connection of its own.
            if silent {
                let late = Box::pin(late_bytes(&app, cfg.handshake_timeout, Side::Client)).await;
                let p = late.unwrap_or(Protocol::Opaque);
                ctx.metrics.detected(Direction::Outbound, p.into());
                if p != Protocol::Opaque {
                    return Some((app, p));
                }
            }
            if let Some(route) = live.route_stats(policy.name()) {
                route.limit_rejected(e.kind);
            }
            debug!(%client, %dst, "{e}; resetting the new connection");
            meter().fail("max_connections");
            socket::reset(app);
            return None;
        }
    };
    let upstream = match live.router.route(dst) {
        Route::Passthrough => None,
        Route::Recheck(key) => {
            crate::router::recheck(ctx.clone(), live.router.clone(), key);
            None
        }
        Route::Mesh { key, probe, renew } => {
            if !ctx.identity.is_ready() {
                let wait = tokio::time::timeout(cfg.handshake_timeout, ctx.identity.ready());
                if wait.await.is_err() {
                    warn!(%client, %dst, "no workload certificate yet, so no mTLS is possible; refusing instead of sending plaintext (is the CA reachable?)");
                    meter().fail("no_certificate");
                    socket::reset(app);
                    return None;
                }
            }
            match ctx.pool().tunnel(&key, dst, key.in_band(dst)).await {
                Ok(tunnel) => {
                    if probe || renew {
                        live.router.learn(dst.ip(), true);
                    }
                    Some(Upstream::Mesh(Box::new(tunnel)))
                }
                Err(e) if probe && e.unanswered() => {
                    debug!(%dst, error = %e, "no proxy answers at the destination; using plaintext");
                    live.router.learn(dst.ip(), false);
                    None
                }
                Err(e) => {
                    // A peer known to be meshed stays so while it does not
                    // answer (see `crate::router`): no plaintext fallback.
                    warn!(%client, %dst, reason = e.reason(), error = %e, "mesh connection failed; closing the application's connection");
                    meter().fail(e.reason());
                    socket::reset(app);
                    return None;
                }
            }
        }
    };
    let mut upstream = match upstream {
        Some(u) => u,
        None => match ctx.clients().dial().connect_one(dst).await {
            Ok(s) => Upstream::Plain(s),
            Err(e) => {
                debug!(%client, %dst, error = %e, "plaintext connect failed");
                meter().fail("connect_failed");
                socket::reset(app);
                return None;
            }
        },
    };
    let mut passed = 0;
    if silent {
        // Boxed: it would otherwise grow every connection's task.
        let settled = match &mut upstream {
            Upstream::Mesh(t) => {
                Box::pin(settle(&mut app, &mut t.io, cfg.idle_timeout, Side::Client)).await
            }
            Upstream::Plain(s) => {
                Box::pin(settle(&mut app, s, cfg.idle_timeout, Side::Client)).await
            }
        };
        match settled {
            Some(Settled::Client(p @ (Protocol::Http1 | Protocol::Http2))) => {
                drop((upstream, held));
                ctx.metrics.detected(Direction::Outbound, p.into());
                return Some((app, p));
            }
            Some(Settled::Client(p)) => ctx.metrics.detected(Direction::Outbound, p.into()),
            Some(Settled::Server(n)) => {
                ctx.metrics.detected(Direction::Outbound, Detected::Opaque);
                passed = n;
            }
            None => {
                debug!(%client, %dst, "neither side spoke, or the application left; closing");
                return None;
            }
        }
    }
    let meter = meter();
    meter.count_written(passed);
    let app = Metered::new(app, meter.clone());
    let (relayed, how) = match upstream {
        Upstream::Mesh(tunnel) => {
            let peer = tunnel.peer.clone();
            meter.set_peer(peer.as_ref());
            (relay(app, tunnel.io, cfg.idle_timeout).await, "mesh")
        }
        Upstream::Plain(s) => {
            meter.set_peer(None);
            (relay(app, s, cfg.idle_timeout).await, "plaintext")
        }
    };
    match relayed {
        Ok(t) => {
            debug!(%client, %dst, sent = t.sent, received = t.received, "{how} connection closed")
        }
        Err(e) => debug!(%client, %dst, error = %e, "{how} connection ended"),
    }
    drop(held);
    None
}
