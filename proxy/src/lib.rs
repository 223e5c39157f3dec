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
//!   in permissive mode and are refused in strict mode. Whatever it takes
//!   for opaque bytes, [`line_guard`] watches until its first line is over,
//!   so that no HTTP request reaches the application unchecked.
//!
//! Bytes are moved by [`relay`], which keeps backpressure, carries
//! half-closes across and closes idle connections. The admin server
//! ([`admin`]) reports liveness and readiness, serves [`metrics`], the
//! effective configuration and the identity, and takes shutdown and log
//! level requests from localhost. [`access`] writes access logs and
//! [`telemetry`] traces.
//!
//! **Lifecycle.** [`Proxy::run`] serves until its shutdown future resolves
//! (SIGTERM) or the admin server is asked to shut down. It then reports not
//! ready, stops accepting, asks every HTTP connection to finish gracefully
//! (HTTP/1.1 closes after the response in flight, HTTP/2 sends GOAWAY) and
//! waits up to `proxy.drain_grace` for connections to end.
//!
//! **Reload.** The policy parts of the configuration (HTTP policy,
//! destination rules, authorization, access-log settings) live in a
//! [`Live`] value behind an `ArcSwap`, read once per connection or request.
//! [`Shared::reload`] swaps in a new one; connections and requests already
//! under way keep the one they started with, so nothing established is
//! dropped. Everything else (listeners, identity, timeouts) needs a restart,
//! and a reload that changes it says which keys wait for one.

pub mod access;
pub mod admin;
pub mod batch;
pub mod detect;
pub(crate) mod h2server;
pub mod h2stream;
pub mod http;
pub mod inbound;
pub mod line_guard;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod relay;
pub mod rewind;
pub mod router;
pub mod socket;
pub mod telemetry;
pub mod tls;
mod worker;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use legate_config::Config;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

pub use tls::{Authority, Identity, IdentityStatus, MeshIdentity, MESH_ALPN};

/// Serves a hyper server connection to its end; once the proxy starts to
/// drain, asks it to finish gracefully (after the request in flight for
/// HTTP/1.1, with GOAWAY for HTTP/2).
macro_rules! serve_draining {
    ($shared:expr, $conn:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let drained = $shared.drained();
        tokio::pin!(drained);
        tokio::select! {
            res = conn.as_mut() => res,
            _ = &mut drained => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}
pub(crate) use serve_draining;

pin_project_lite::pin_project! {
    /// The end of [`Shared::drained`]: resolves once the proxy starts to
    /// drain.
    ///
    /// It is polled beside a connection each time the connection's task
    /// wakes, several times per request, and each poll of the watch takes
    /// its waiters' lock. Once the first poll has registered the task for
    /// the wake-up, the draining flag, set before the watch is sent, says
    /// whether there is anything to poll for. That holds because the future
    /// never leaves the task that first polled it (`serve_draining!` and
    /// the mesh server pin it beside their connection), so the registered
    /// waker stays the right one.
    pub(crate) struct Drained<'a, F> {
        #[pin]
        wait: F,
        draining: &'a AtomicBool,
        registered: bool,
    }
}

impl<F: Future<Output = ()>> Future for Drained<'_, F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        if *this.registered && !this.draining.load(Ordering::Acquire) {
            return std::task::Poll::Pending;
        }
        *this.registered = true;
        this.wait.poll(cx)
    }
}

/// Changes the log filter at runtime.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the binary hands the proxy besides its configuration.
#[derive(Default)]
pub struct Hooks {
    /// Backs `PUT /log-level` on the admin server.
    pub set_log_level: Option<LogLevelSetter>,
    /// Traces; off when `None`.
    pub tracing: Option<telemetry::Tracing>,
    /// Where access logs go; stdout when `None`.
    pub access_log: Option<Arc<access::AccessLog>>,
}

/// The reloadable part of the configuration, with what is built from it.
pub struct Live {
    /// The whole configuration last loaded, for `/config`.
    pub(crate) config: Arc<Config>,
    pub(crate) router: Arc<router::Router>,
    pub(crate) authz: inbound::Authz,
    pub(crate) policies: policy::PolicySet,
    /// Metrics of each policy, by name.
    routes: HashMap<String, Arc<metrics::RouteStats>>,
}

impl Live {
    fn new(config: Arc<Config>, old: Option<&Live>, metrics: &metrics::Metrics) -> Self {
        let p = &config.proxy;
        let router = match old {
            // Keep the probe cache unless the rules it depends on changed.
            Some(o)
                if o.config.proxy.destinations == p.destinations
                    && o.config.proxy.mesh_networks == p.mesh_networks
                    && o.config.proxy.probe_ttl == p.probe_ttl =>
            {
                o.router.clone()
            }
            _ => Arc::new(router::Router::new(
                p.destinations.clone(),
                p.mesh_networks.clone(),
                p.inbound_port,
                p.probe_ttl,
            )),
        };
        let policies = match old {
            Some(o) => o.policies.reload(&config),
            None => policy::PolicySet::new(&config),
        };
        let routes = policies
            .policies()
            .map(|p| (p.name().to_owned(), metrics.route(p.name())))
            .collect();
        Live {
            authz: inbound::Authz::new(&config),
            router,
            policies,
            routes,
            config,
        }
    }

    /// The metrics of the policy named `name`.
    pub(crate) fn route_stats(&self, name: &str) -> Option<Arc<metrics::RouteStats>> {
        self.routes.get(name).cloned()
    }
}

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
    /// The configuration the proxy started with: listeners, timeouts and
    /// the rest of what a reload does not change.
    pub(crate) config: Arc<Config>,
    pub(crate) identity: Identity,
    /// One pool of mesh connections and one set of plain HTTP clients per
    /// worker thread: a connection's task runs on the worker that opened
    /// it, so requests on the same worker never wake another thread.
    pools: Box<[pool::Pool]>,
    clients: Box<[http::client::Clients]>,
    live: ArcSwap<Live>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) access: Arc<access::AccessLog>,
    pub(crate) tracing: Option<telemetry::Tracing>,
    set_log_level: Option<LogLevelSetter>,
    local_addrs: Vec<IpAddr>,
    draining: AtomicBool,
    drain: watch::Sender<bool>,
    shutdown: Notify,
    active: AtomicUsize,
    idle: Notify,
}

impl Shared {
    /// Worker threads carrying traffic: one pool and one set of clients each.
    pub(crate) fn workers(&self) -> usize {
        self.pools.len()
    }

    /// The mesh connection pool of the calling worker thread.
    pub(crate) fn pool(&self) -> &pool::Pool {
        &self.pools[worker::current() % self.pools.len()]
    }

    /// The plain HTTP clients of the calling worker thread.
    pub(crate) fn clients(&self) -> &http::client::Clients {
        &self.clients[worker::current() % self.clients.len()]
    }

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

    /// Whether the proxy is ready to carry mesh traffic: a certificate is
    /// in hand (the listeners are bound before the proxy runs), and it is
    /// not draining.
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

    /// The metrics and access log of one accepted connection, from
    /// `client` to `dst`, of `protocol` (see [`metrics::protocol_label`]).
    pub(crate) fn conn_meter(
        &self,
        dir: Direction,
        client: SocketAddr,
        dst: SocketAddr,
        protocol: &'static str,
    ) -> Arc<telemetry::conn::ConnMeter> {
        telemetry::conn::ConnMeter::new(
            self.metrics.clone(),
            &self.access,
            dir,
            client,
            dst,
            protocol,
        )
    }

    /// The policy in force now. Hold it for one connection or request.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The policy in force now, for a check that ends before the caller's
    /// next await. Unlike [`Shared::live`] it takes no reference count, so
    /// workers checking at once do not contend for one.
    pub(crate) fn live_now(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }

    /// Applies a reloaded configuration: policy, destination rules,
    /// authorization and access-log settings change at once for new
    /// connections and requests. Returns the keys that changed but only
    /// take effect after a restart.
    pub fn reload(&self, config: Config) -> Vec<&'static str> {
        let old = self.live.load_full();
        let restart = needs_restart(&self.config, &config);
        self.access.configure(&config.log);
        let live = Live::new(Arc::new(config), Some(&old), &self.metrics);
        self.live.store(Arc::new(live));
        self.metrics.reloaded(true);
        restart
    }

    /// Counts a reload that was refused because the new configuration is
    /// invalid.
    pub fn reload_failed(&self) {
        self.metrics.reloaded(false);
    }

    /// Asks [`Proxy::run`] to drain and return, as SIGTERM does.
    pub fn request_shutdown(&self) {
        self.shutdown.notify_one();
    }

    /// The access log.
    pub fn access_log(&self) -> &Arc<access::AccessLog> {
        &self.access
    }

    /// The trace exporter, when tracing is on.
    pub fn tracing_handle(&self) -> Option<&telemetry::Tracing> {
        self.tracing.as_ref()
    }

    /// Whether the proxy has started to drain.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Resolves once the proxy starts to drain.
    pub(crate) fn drained(&self) -> Drained<'_, impl Future<Output = ()> + 'static> {
        let mut rx = self.drain.subscribe();
        Drained {
            wait: async move {
                let _ = rx.wait_for(|d| *d).await;
            },
            draining: &self.draining,
            registered: false,
        }
    }

    /// The metrics text, as `/metrics` serves it.
    pub fn render_metrics(&self) -> String {
        let live = self.live();
        let status = self.identity.status();
        let cert = metrics::CertStatus {
            not_after: status.not_after,
            renewals: status.renewals,
            renewal_failures: status.renewal_failures,
        };
        let mut handshakes = (0, [0; 3]);
        for p in &self.pools {
            let (ok, failed) = p.handshakes();
            handshakes.0 += ok;
            for (sum, n) in handshakes.1.iter_mut().zip(failed) {
                *sum += n;
            }
        }
        let pool = metrics::PoolStatus {
            connections: self.pools.iter().map(pool::Pool::open_connections).sum(),
            own_connections: self.pools.iter().map(pool::Pool::own_connections).sum(),
            handshakes,
        };
        self.metrics
            .render(live.policies.policies().cloned().collect(), pool, cert)
    }

    pub(crate) fn set_log_level(&self, filter: &str) -> Result<(), String> {
        match &self.set_log_level {
            Some(set) => set(filter),
            None => Err("this proxy cannot change its log level at runtime".into()),
        }
    }
}

/// Keys outside the reloadable policy whose values differ.
fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    // The pattern names every field, without `..`: a key added to the
    // model does not compile here until it is sorted into what waits for a
    // restart and what a reload applies, so none is ignored without a word.
    macro_rules! sort {
        (restart: [$($key:ident),* $(,)?], reloaded: [$($live:ident),* $(,)?] $(,)?) => {
            let legate_config::ProxyConfig { $($key,)* $($live: _,)* } = &running.proxy;
            $(if *$key != new.proxy.$key {
                out.push(concat!("proxy.", stringify!($key)));
            })*
        };
    }
    sort!(
        restart: [
            uid,
            gid,
            outbound_port,
            inbound_port,
            admin_listen,
            mode,
            connect_timeout,
            handshake_timeout,
            idle_timeout,
            tcp_keepalive,
            peer_timeout,
            drain_grace,
            workers,
            pool_max_connections,
            pool_max_streams,
            pool_idle_timeout,
            opaque_ports,
        ],
        reloaded: [mesh_networks, probe_ttl, destinations, authz, http],
    );
    let legate_config::LogConfig {
        level: _,
        format,
        access: _,
        access_sample: _,
        access_paths: _,
    } = &running.log;
    if *format != new.log.format {
        out.push("log.format");
    }
    if running.identity != new.identity {
        out.push("identity");
    }
    if running.telemetry != new.telemetry {
        out.push("telemetry");
    }
    out
}

/// Counts a connection as active until dropped.
pub(crate) struct ConnGuard(Arc<Shared>);

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
        Self::bind_with(config, identity, Hooks::default())
    }

    /// [`bind`](Self::bind), with what only the binary can provide.
    pub fn bind_with(
        config: Arc<Config>,
        identity: Identity,
        hooks: Hooks,
    ) -> Result<Self, ProxyError> {
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
        let metrics = Arc::new(metrics::Metrics::new());
        let access = hooks
            .access_log
            .unwrap_or_else(|| Arc::new(access::AccessLog::stdout(&config.log, metrics.clone())));
        access.set_local_id(identity.local_id().as_str());
        let live = Live::new(config.clone(), None, &metrics);
        let workers = worker::count(&config);
        let shared = Arc::new(Shared {
            pools: (0..workers)
                .map(|_| {
                    pool::Pool::new(
                        identity.clone(),
                        pool::PoolSettings {
                            connect_timeout: p.connect_timeout,
                            handshake_timeout: p.handshake_timeout,
                            keepalive: p.tcp_keepalive,
                            max_connections: p.pool_max_connections as usize,
                            max_streams: p.pool_max_streams as usize,
                            idle_timeout: p.pool_idle_timeout,
                            peer_timeout: p.peer_timeout,
                        },
                    )
                })
                .collect(),
            clients: (0..workers)
                .map(|_| {
                    http::client::Clients::new(socket::Dial {
                        timeout: p.connect_timeout,
                        keepalive: p.tcp_keepalive,
                    })
                })
                .collect(),
            live: ArcSwap::from_pointee(live),
            metrics,
            access,
            tracing: hooks.tracing,
            set_log_level: hooks.set_log_level,
            local_addrs: socket::local_addresses(),
            draining: AtomicBool::new(false),
            drain: watch::Sender::new(false),
            shutdown: Notify::new(),
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
        let workers = worker::Workers::start(&shared);
        let mut tasks = tokio::task::JoinSet::new();
        for l in outbound {
            tasks.spawn(accept_loop(
                shared.clone(),
                l,
                Direction::Outbound,
                workers.lanes(),
            ));
        }
        for l in inbound {
            tasks.spawn(accept_loop(
                shared.clone(),
                l,
                Direction::Inbound,
                workers.lanes(),
            ));
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
                    for p in &shared.pools {
                        p.sweep();
                    }
                }
            })
        };
        info!(
            id = %shared.identity.local_id(),
            workers = shared.workers(),
            "proxy started"
        );

        tokio::select! {
            _ = shutdown => {}
            _ = shared.shutdown.notified() => info!("shutdown requested through the admin server"),
        }
        // Before the watch is sent: `Drained` polls the watch only once
        // it sees this.
        shared.draining.store(true, Ordering::Release);
        shared.metrics.set_draining();
        tasks.abort_all();
        // Let the accept loops go (and their listeners close) before the
        // HTTP connections are told to finish.
        while tasks.join_next().await.is_some() {}
        shared.drain.send_replace(true);
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
        workers.stop();
    }
}

use metrics::Direction;

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    dir: Direction,
    mut lanes: worker::Lanes,
) {
    loop {
        match listener.accept().await {
            Ok((sock, client)) => {
                let conn = worker::Accepted {
                    guard: shared.track(),
                    sock,
                    client,
                    dir,
                };
                if let Some(conn) = lanes.hand_over(conn) {
                    handle(conn);
                }
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Handles an accepted connection on the calling worker, to the end.
pub(crate) fn handle(conn: worker::Accepted) {
    let worker::Accepted {
        guard,
        sock,
        client,
        dir,
    } = conn;
    tokio::spawn(connection(guard, sock, client, dir));
}

/// One accepted connection's task. Its future is allocated per connection
/// and moved by value as the task is made, so it is kept to the size of
/// what every connection needs (detection, an opaque relay or tunnel):
/// the larger states that only some reach, HTTP serving and the mesh
/// server, are boxed where they start.
async fn connection(
    guard: ConnGuard,
    sock: tokio::net::TcpStream,
    client: SocketAddr,
    dir: Direction,
) {
    let ctx = guard.0.clone();
    match dir {
        Direction::Outbound => outbound::handle(ctx, sock, client).await,
        Direction::Inbound => inbound::handle(ctx, sock, client).await,
    }
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F: Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_connection_task_stays_small() {
        // Every accepted connection allocates its task and copies this
        // future into it; 1000 idle connections hold 1000 of them. The
        // mesh server's state once made it 9.4 KB.
        let size = future_size(connection);
        assert!(
            size <= 2048,
            "a connection's future is {size} bytes: box the large state that made it grow"
        );
    }

    fn with(sets: &[(&str, &str)]) -> Config {
        let sources = legate_config::Sources {
            flags: sets
                .iter()
                .map(|(path, value)| legate_config::FlagValue {
                    path: (*path).into(),
                    value: (*value).into(),
                    flag: format!("--set {path}={value}"),
                })
                .collect(),
            ..Default::default()
        };
        legate_config::load(&sources).expect("valid").config
    }

    #[test]
    fn a_reload_names_every_changed_key_it_cannot_apply() {
        let running = with(&[]);
        // The pool's bounds were once missing from the list: a reload
        // that changed them said nothing, and they never took effect.
        let new = with(&[
            ("proxy.pool_max_streams", "10"),
            ("proxy.pool_max_connections", "2"),
            ("proxy.pool_idle_timeout", "5s"),
            ("proxy.peer_timeout", "30s"),
            ("log.format", "json"),
            ("proxy.connect_timeout", "1s"),
        ]);
        assert_eq!(
            needs_restart(&running, &new),
            [
                "proxy.connect_timeout",
                "proxy.peer_timeout",
                "proxy.pool_max_connections",
                "proxy.pool_max_streams",
                "proxy.pool_idle_timeout",
                "log.format",
            ]
        );
        // What a reload applies is not reported.
        let policy = with(&[
            ("proxy.http.attempts", "3"),
            ("proxy.probe_ttl", "5s"),
            ("proxy.mesh_networks", "10.200.0.0/16"),
            ("log.level", "debug"),
            ("log.access", "on"),
        ]);
        assert_eq!(needs_restart(&running, &policy), Vec::<&str>::new());
    }
}
