//! The outbound side: connections the application makes, captured by
//! `legate init`'s OUTPUT rules onto `127.0.0.1:15001` and `[::1]:15001`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::detect::{detect, Protocol};
use crate::metrics::{protocol_label, Detected, Direction};
use crate::policy::LimitKind;
use crate::pool::TunnelError;
use crate::relay::relay;
use crate::router::Route;
use crate::socket;
use crate::telemetry::conn::{ConnMeter, Metered};
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
        Protocol::Opaque
    } else {
        let p = detect(&app).await;
        ctx.metrics.detected(Direction::Outbound, p.into());
        p
    };
    let meter = ConnMeter::new(
        ctx.metrics.clone(),
        &ctx.access,
        Direction::Outbound,
        client,
        dst,
        protocol_label(proto),
    );
    if proto != Protocol::Opaque {
        // Boxed, like every large state a connection reaches on one path
        // only: a connection's task is as large as its largest state, and
        // an opaque connection would otherwise carry HTTP's for its whole
        // life (see `lib.rs`'s `connection`).
        Box::pin(crate::http::outbound::serve(
            ctx, app, client, dst, proto, meter,
        ))
        .await;
        return;
    }
    let live = ctx.live();
    // Each opaque connection is one connection at the destination (the
    // peer proxy opens one to its application per tunnel), so it counts
    // against the destination's `max_connections` while it lasts.
    let policy = live.policies.policy_for(dst, None);
    let _held = match policy
        .destination(dst)
        .limits
        .acquire(LimitKind::Connections)
    {
        Ok(guard) => guard,
        Err(e) => {
            if let Some(route) = live.route_stats(policy.name()) {
                route.limit_rejected(e.kind);
            }
            debug!(%client, %dst, "{e}; resetting the new connection");
            meter.fail("max_connections");
            socket::reset(app);
            return;
        }
    };
    match live.router.route(dst) {
        Route::Passthrough => passthrough(&ctx, app, client, dst, &meter).await,
        Route::Mesh { key, probe } => {
            if !ctx.identity.is_ready() {
                let wait = tokio::time::timeout(cfg.handshake_timeout, ctx.identity.ready());
                if wait.await.is_err() {
                    warn!(%client, %dst, "no workload certificate yet, so no mTLS is possible; refusing instead of sending plaintext (is the CA reachable?)");
                    meter.fail("no_certificate");
                    socket::reset(app);
                    return;
                }
            }
            match ctx.pool().tunnel(&key, dst).await {
                Ok(tunnel) => {
                    if probe {
                        live.router.learn(dst.ip(), true);
                    }
                    let peer = tunnel.peer.clone();
                    meter.set_peer(peer.as_ref());
                    let app = Metered::new(app, meter.clone());
                    match relay(app, tunnel.io, cfg.idle_timeout).await {
                        Ok(t) => {
                            debug!(%client, %dst, peer = ?peer.as_ref().map(|p| p.as_str()), sent = t.sent, received = t.received, "mesh connection closed")
                        }
                        Err(e) => debug!(%client, %dst, error = %e, "mesh connection ended"),
                    }
                }
                Err(TunnelError::Connect(e)) if probe => {
                    debug!(%dst, error = %e, "no proxy answers at the destination; using plaintext");
                    live.router.learn(dst.ip(), false);
                    passthrough(&ctx, app, client, dst, &meter).await;
                }
                Err(e) => {
                    if matches!(e, TunnelError::Connect(_)) {
                        // The peer proxy may be gone; check again next time.
                        live.router.forget(dst.ip());
                    }

                    warn!(%client, %dst, reason = e.reason(), error = %e, "mesh connection failed; closing the application's connection");
                    meter.fail(e.reason());
                    socket::reset(app);
                }
            }
        }
    }
}

async fn passthrough(
    ctx: &Shared,
    app: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    meter: &std::sync::Arc<ConnMeter>,
) {
    meter.set_peer(None);
    let upstream = match ctx.clients().dial().connect_one(dst).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%client, %dst, error = %e, "plaintext connect failed");
            meter.fail("connect_failed");
            socket::reset(app);
            return;
        }
    };
    let app = Metered::new(app, meter.clone());
    match relay(app, upstream, ctx.config.proxy.idle_timeout).await {
        Ok(t) => {
            debug!(%client, %dst, sent = t.sent, received = t.received, "plaintext connection closed")
        }
        Err(e) => debug!(%client, %dst, error = %e, "plaintext connection ended"),
    }
}
