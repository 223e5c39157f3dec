//! The legate data plane.
//!
//! A captured connection takes one of two paths:
//!
//! - **outbound** ([`outbound`]): the application's own connections, which
//!   `legate init` redirects to 127.0.0.1:15001. The proxy reads the original
//!   destination, decides with the [`router`] whether a peer proxy sits
//!   there, and either carries the bytes over a pooled mTLS connection to
//!   that proxy ([`pool`]) or passes them through untouched.
//! - **inbound** ([`inbound`]): connections to the application, redirected
//!   to port 15006. Mesh TLS from a peer proxy is terminated, its SPIFFE
//!   identity checked against the port's policy, and each tunnelled stream
//!   forwarded to the application on localhost. Other clients pass through
//!   in permissive mode and are refused in strict mode.
//!
//! Bytes are moved by [`relay`], which keeps backpressure, carries
//! half-closes across and closes idle connections. The admin server
//! ([`admin`]) reports liveness and readiness.

pub mod admin;
pub mod detect;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod relay;
pub mod router;
pub mod socket;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use legate_config::Config;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{info, warn};

pub use tls::{Identity, MeshIdentity, MESH_ALPN};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}; is another proxy already running, or is the port taken? (set {key} to change it)")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        #[source]
        source: io::Error,
    },
}

/// State every connection handler shares.
pub struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) identity: Identity,
    pub(crate) router: router::Router,
    pub(crate) pool: pool::Pool,
    pub(crate) authz: inbound::Authz,
    pub(crate) clients: http::client::Clients,
    pub(crate) policies: policy::PolicySet,
    local_addrs: Vec<IpAddr>,
    draining: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
}

impl Shared {
    /// Whether `dst` is one of this proxy's own listeners, which must never
    /// be forwarded to (that would loop through the proxy forever).
    pub(crate) fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let p = &self.config.proxy;
        let port = dst.port();
        let ours =
            port == p.outbound_port || port == p.inbound_port || port == p.admin_listen.port();
        ours && (dst.ip().is_loopback()
            || dst.ip().is_unspecified()
            || self.local_addrs.contains(&dst.ip()))
    }

    /// Whether the proxy is ready to carry mesh traffic.
    pub fn is_ready(&self) -> bool {
        self.identity.is_ready() && !self.draining.load(Ordering::Relaxed)
    }

    fn track(self: &Arc<Self>) -> ConnGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone())
    }

    /// Connections being handled now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a connection as active until dropped.
struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A proxy with its listeners bound, ready to run.
pub struct Proxy {
    shared: Arc<Shared>,
    outbound: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    admin: TcpListener,
}

/// Binds the IPv4 listener, which must work, and the IPv6 one, which may
/// not when the namespace has IPv6 disabled.
fn bind_pair(
    v4: SocketAddr,
    v6: SocketAddr,
    key: &'static str,
) -> Result<Vec<TcpListener>, ProxyError> {
    let mut out = vec![socket::listen(v4).map_err(|source| ProxyError::Bind {
        addr: v4,
        key,
        source,
    })?];
    match socket::listen(v6) {
        Ok(l) => out.push(l),
        Err(e) => {
            warn!(addr = %v6, error = %e, "no IPv6 listener; IPv6 traffic will not be proxied")
        }
    }
    Ok(out)
}

impl Proxy {
    /// Binds the outbound, inbound and admin listeners.
    pub fn bind(config: Arc<Config>, identity: Identity) -> Result<Self, ProxyError> {
        let p = &config.proxy;
        let outbound = bind_pair(
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p.outbound_port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), p.outbound_port),
            "proxy.outbound_port",
        )?;
        let inbound = bind_pair(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), p.inbound_port),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), p.inbound_port),
            "proxy.inbound_port",
        )?;
        let admin = socket::listen(p.admin_listen).map_err(|source| ProxyError::Bind {
            addr: p.admin_listen,
            key: "proxy.admin_listen",
            source,
        })?;
        let shared = Arc::new(Shared {
            router: router::Router::new(
                p.destinations.clone(),
                p.mesh_networks.clone(),
                p.inbound_port,
                p.probe_ttl,
            ),
            pool: pool::Pool::new(
                identity.clone(),
                pool::PoolSettings {
                    connect_timeout: p.connect_timeout,
                    handshake_timeout: p.handshake_timeout,
                    keepalive: p.tcp_keepalive,
                    max_connections: p.pool_max_connections as usize,
                    max_streams: p.pool_max_streams as usize,
                    idle_timeout: p.pool_idle_timeout,
                },
            ),
            authz: inbound::Authz::new(&config),
            clients: http::client::Clients::new(p.connect_timeout, p.tcp_keepalive),
            policies: policy::PolicySet::new(&config),
            local_addrs: socket::local_addresses(),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            identity,
            config,
        });
        Ok(Proxy {
            shared,
            outbound,
            inbound,
            admin,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets
    /// connections in flight finish within `proxy.drain_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Proxy {
            shared,
            outbound,
            inbound,
            admin,
        } = self;
        let mut tasks = tokio::task::JoinSet::new();
        for l in outbound {
            tasks.spawn(accept_loop(shared.clone(), l, Direction::Outbound));
        }
        for l in inbound {
            tasks.spawn(accept_loop(shared.clone(), l, Direction::Inbound));
        }
        let admin_task = tokio::spawn(admin::serve(shared.clone(), admin));
        let sweeper = {
            let shared = shared.clone();
            let p = &shared.config.proxy;
            // Often enough that a short idle timeout is honoured closely.
            let every = (p.pool_idle_timeout / 2).clamp(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(10),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    shared.pool.sweep();
                }
            })
        };
        info!(id = %shared.identity.local_id(), "proxy started");

        shutdown.await;
        shared.draining.store(true, Ordering::Relaxed);
        tasks.abort_all();
        let grace = shared.config.proxy.drain_grace;
        info!(active = shared.active_connections(), ?grace, "draining");
        let drained = async {
            loop {
                let idle = shared.idle.notified();
                if shared.active_connections() == 0 {
                    break;
                }
                idle.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            warn!(
                active = shared.active_connections(),
                "drain grace period over; closing the remaining connections"
            );
        }
        admin_task.abort();
        sweeper.abort();
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Outbound,
    Inbound,
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, dir: Direction) {
    loop {
        match listener.accept().await {
            Ok((sock, client)) => {
                let guard = shared.track();
                let ctx = shared.clone();
                tokio::spawn(async move {
                    match dir {
                        Direction::Outbound => outbound::handle(ctx, sock, client).await,
                        Direction::Inbound => inbound::handle(ctx, sock, client).await,
                    }
                    drop(guard);
                });
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
