//! The outbound side: connections the application makes, captured by
//! `legate init`'s OUTPUT rules onto 127.0.0.1:15001 and [::1]:15001.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::detect::{detect, Protocol};
use crate::pool::TunnelError;
use crate::relay::relay;
use crate::router::Route;
use crate::socket;
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
        Protocol::Opaque
    } else {
        detect(&app).await
    };
    if proto != Protocol::Opaque {
        crate::http::outbound::serve(ctx, app, client, dst, proto).await;
        return;
    }
    match ctx.router.route(dst) {
        Route::Passthrough => passthrough(&ctx, app, client, dst).await,
        Route::Mesh { key, probe } => {
            if !ctx.identity.is_ready() {
                let wait = tokio::time::timeout(cfg.handshake_timeout, ctx.identity.ready());
                if wait.await.is_err() {
                    warn!(%client, %dst, "no workload certificate yet, so no mTLS is possible; refusing instead of sending plaintext (is the CA reachable?)");
                    socket::reset(app);
                    return;
                }
            }
            match ctx.pool.tunnel(&key, dst).await {
                Ok(tunnel) => {
                    if probe {
                        ctx.router.learn(dst.ip(), true);
                    }
                    let peer = tunnel.peer.clone();
                    match relay(app, tunnel.io, cfg.idle_timeout).await {
                        Ok(t) => {
                            debug!(%client, %dst, peer = ?peer.as_ref().map(|p| p.as_str()), sent = t.sent, received = t.received, "mesh connection closed")
                        }
                        Err(e) => debug!(%client, %dst, error = %e, "mesh connection ended"),
                    }
                }
                Err(TunnelError::Connect(e)) if probe => {
                    debug!(%dst, error = %e, "no proxy answers at the destination; using plaintext");
                    ctx.router.learn(dst.ip(), false);
                    passthrough(&ctx, app, client, dst).await;
                }
                Err(e) => {
                    if matches!(e, TunnelError::Connect(_)) {
                        // The peer proxy may be gone; check again next time.
                        ctx.router.forget(dst.ip());
                    }
                    warn!(%client, %dst, reason = e.reason(), error = %e, "mesh connection failed; closing the application's connection");
                    socket::reset(app);
                }
            }
        }
    }
}

async fn passthrough(ctx: &Shared, app: TcpStream, client: SocketAddr, dst: SocketAddr) {
    let cfg = &ctx.config.proxy;
    let upstream = match socket::connect(dst, cfg.connect_timeout, cfg.tcp_keepalive).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%client, %dst, error = %e, "plaintext connect failed");
            socket::reset(app);
            return;
        }
    };
    match relay(app, upstream, cfg.idle_timeout).await {
        Ok(t) => {
            debug!(%client, %dst, sent = t.sent, received = t.received, "plaintext connection closed")
        }
        Err(e) => debug!(%client, %dst, error = %e, "plaintext connection ended"),
    }
}
