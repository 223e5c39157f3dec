//! The inbound side: connections to the application, captured by
//! `legate init`'s PREROUTING rules onto port 15006.
//!
//! A connection is either mesh TLS from a peer proxy (a TLS ClientHello
//! offering the [`MESH_ALPN`] protocol) or anything else, which is a client
//! outside the mesh. The first bytes are peeked, never consumed, so that a
//! plaintext connection reaches the application byte for byte.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use legate_config::{Config, InboundMode, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::batch::Batched;
use crate::detect::DETECT_TIMEOUT;
use crate::detect::{detect_or_silent, late_bytes, settle, Protocol, Settled, Side};
use crate::h2server::Tunnel;
use crate::http::inbound::{answered, Answering};
use crate::line_guard::Guarded;
use crate::metrics::{protocol_label, Detected, Direction, TlsFailure};
use crate::policy::proxy_answer;
use crate::pool::Body;
use crate::relay::relay;
use crate::socket::{self, Targets};
use crate::telemetry::conn::Metered;
use crate::tls::MESH_ALPN;
use crate::Shared;

/// Largest TLS record holding a ClientHello that is inspected.
const MAX_HELLO: usize = 5 + 16 * 1024;

/// Handles one captured inbound connection to the end.
pub(crate) async fn handle(ctx: Arc<Shared>, sock: TcpStream, client: SocketAddr) {
    let cfg = &ctx.config.proxy;
    socket::tune(&sock, cfg.tcp_keepalive);
    // Without a redirect (a peer dialling the mesh port itself) the original
    // destination is the listener's own address.
    let dst = match socket::original_dst(&sock).or_else(|_| sock.local_addr()) {
        Ok(dst) => dst,
        Err(e) => {
            debug!(%client, error = %e, "connection vanished before it could be read");
            return;
        }
    };
    let proto = if cfg.opaque_ports.contains(dst.port()) {
        ctx.metrics.detected(Direction::Inbound, Detected::Skipped);
        Protocol::Opaque
    } else {
        match detect_or_silent(&sock, Side::Server).await {
            Some(p) => {
                ctx.metrics.detected(Direction::Inbound, p.into());
                p
            }
            None => {
                // Boxed: only silent clients take this path.
                Box::pin(silent(ctx, sock, client, dst)).await;
                return;
            }
        }
    };
    dispatch(ctx, sock, client, dst, proto, None).await;
}

/// Sends a connection whose protocol is known on its way: mesh TLS to the
/// mesh server, anything else to the application. `app` is the
/// application's connection when it was made before the client spoke.
async fn dispatch(
    ctx: Arc<Shared>,
    sock: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    app: Option<(TcpStream, usize)>,
) {
    let cfg = &ctx.config.proxy;
    if proto == Protocol::Opaque && is_mesh_hello(&sock, cfg.handshake_timeout).await {
        drop(app);
        // Boxed: the mesh server's state (9 KB) would otherwise size the
        // task of every connection the proxy accepts, in both directions.
        Box::pin(serve_mesh(ctx, sock, client, dst)).await;
    } else {
        plaintext(ctx, sock, client, dst, proto, app).await;
    }
}

/// A client that said nothing within the detection window: a plaintext
/// client waiting for its server to speak first, a client that speaks
/// later (HTTP included), or a peer proxy whose ClientHello is late. Where
/// a client outside the mesh may talk to the application, the application
/// is connected at once and [`settle`] waits for whichever side speaks
/// first; elsewhere only a peer proxy is welcome, and it speaks first.
async fn silent(ctx: Arc<Shared>, mut sock: TcpStream, client: SocketAddr, dst: SocketAddr) {
    let cfg = &ctx.config.proxy;
    if refusal_of_outsiders(&ctx, dst.port()).is_some() {
        let proto = late_bytes(&sock, cfg.handshake_timeout, Side::Server)
            .await
            .unwrap_or(Protocol::Opaque);
        ctx.metrics.detected(Direction::Inbound, proto.into());
        return dispatch(ctx, sock, client, dst, proto, None).await;
    }
    let mut app = match connect_app(&ctx, dst.ip(), dst.port()).await {
        Ok(app) => app,
        Err(e) => {
            ctx.metrics
                .detected(Direction::Inbound, Protocol::Opaque.into());
            debug!(%client, port = dst.port(), error = %e, "application connect failed");
            let meter = ctx.conn_meter(
                Direction::Inbound,
                client,
                dst,
                protocol_label(Protocol::Opaque),
            );
            meter.set_peer(None);
            meter.fail("application_connect_failed");
            socket::reset(sock);
            return;
        }
    };
    match settle(&mut sock, &mut app, cfg.idle_timeout, Side::Server).await {
        Some(Settled::Client(proto)) => {
            ctx.metrics.detected(Direction::Inbound, proto.into());
            let app = (proto == Protocol::Opaque).then_some((app, 0));
            dispatch(ctx, sock, client, dst, proto, app).await;
        }
        Some(Settled::Server(passed)) => {
            ctx.metrics.detected(Direction::Inbound, Detected::Opaque);
            let app = Some((app, passed));
            plaintext(ctx, sock, client, dst, Protocol::Opaque, app).await;
        }
        None => {
            debug!(%client, port = dst.port(), "neither side spoke, or the client left; closing")
        }
    }
}

/// Peeks at the first TLS record and reports whether it is a ClientHello
/// offering the mesh protocol.
async fn is_mesh_hello(sock: &TcpStream, patience: Duration) -> bool {
    let mut buf = vec![0u8; 5];
    // Detection has already seen bytes (or given up), so this returns at once.
    match tokio::time::timeout(DETECT_TIMEOUT, sock.peek(&mut buf)).await {
        Ok(Ok(n)) if n >= 1 && buf[0] == 0x16 => {}
        _ => return false,
    }
    let deadline = tokio::time::Instant::now() + patience;
    // The header may arrive in pieces; wait for all 5 bytes, then the record.
    let mut want = 5;
    loop {
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let n = match sock.peek(&mut buf).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n >= 5 && want == 5 {
            if buf[1] != 0x03 {
                return false;
            }
            want = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if want > MAX_HELLO {
                return false;
            }
            continue;
        }
        if n >= want {
            break;
        }
        if tokio::time::Instant::now() >= deadline || n == 0 {
            return false;
        }
        // peek returns at once while data is buffered; poll gently for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    offers_mesh_alpn(&buf[..want])
}

/// Parses a ClientHello record with rustls and looks for the mesh ALPN.
fn offers_mesh_alpn(record: &[u8]) -> bool {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd: &[u8] = record;
    if acceptor.read_tls(&mut rd).is_err() {
        return false;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted
            .client_hello()
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == MESH_ALPN)),
        _ => false,
    }
}

async fn serve_mesh(ctx: Arc<Shared>, sock: TcpStream, client: SocketAddr, dst: SocketAddr) {
    let cfg = &ctx.config.proxy;
    let meter = ctx.conn_meter(Direction::Inbound, client, dst, "mtls");
    let acceptor = TlsAcceptor::from(ctx.identity.server_config());
    socket::give_up_unacknowledged(&sock, cfg.peer_timeout);
    let sock = Metered::new(sock, meter.clone());
    let failed = |f: TlsFailure, reason: &'static str| {
        ctx.metrics.tls_handshake(Direction::Inbound, Err(f));
        meter.fail(reason);
    };
    let mut tls = match tokio::time::timeout(
        cfg.handshake_timeout,
        acceptor.accept(socket::tls_transport(sock)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(%client, reason = "handshake_failed", error = %e, "mTLS handshake from a peer proxy failed");
            failed(TlsFailure::HandshakeFailed, "handshake_failed");
            return;
        }
        Err(_) => {
            warn!(%client, reason = "handshake_timeout", "mTLS handshake from a peer proxy timed out");
            failed(TlsFailure::HandshakeTimeout, "handshake_timeout");
            return;
        }
    };
    socket::limit_tls_writes(tls.get_mut().1);
    let peer = ctx.identity.peer_id(tls.get_ref().1);
    let Some(peer) = peer else {
        warn!(%client, "peer proxy presented no SPIFFE identity; closing");
        failed(TlsFailure::NoIdentity, "no_identity");
        return;
    };
    ctx.metrics.tls_handshake(Direction::Inbound, Ok(()));
    meter.set_peer(Some(&peer));
    info!(%client, peer = %peer, "accepted mesh connection");
    let mesh_peer = crate::http::inbound::Peer::new(peer.clone());
    let served = crate::h2server::serve(
        Batched::new(tls),
        cfg.handshake_timeout,
        cfg.peer_timeout,
        ctx.drained(),
        |req| stream(&ctx, req, client, dst, &mesh_peer),
    )
    .await;
    if let Err(e) = served {
        debug!(%client, peer = %peer, error = %e, "mesh connection ended");
    }
}

/// One stream from a peer proxy: authorized here, then either an HTTP
/// request for the application or a `CONNECT` tunnel to it. The checks run
/// before the stream's future exists, so that the future holds only what
/// the request or the tunnel still needs.
fn stream(
    ctx: &Arc<Shared>,
    req: http::Request<Body>,
    client: SocketAddr,
    dst: SocketAddr,
    mesh_peer: &crate::http::inbound::Peer,
) -> Answering {
    let peer = &mesh_peer.id;
    let cfg = &ctx.config.proxy;
    let plain_connect = req.method() == http::Method::CONNECT
        && req.extensions().get::<h2::ext::Protocol>().is_none();
    // A connection captured from an application port carries that port for
    // all its streams (this is how a Service virtual IP's target port is
    // honoured); one dialled to the mesh port names the port per stream.
    let port = if dst.port() != cfg.inbound_port {
        dst.port()
    } else {
        let target = if plain_connect {
            req.uri().authority().and_then(|a| a.port_u16())
        } else {
            req.headers()
                .get(crate::http::TARGET_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<SocketAddr>().ok())
                .map(|a| a.port())
        };
        match target {
            Some(p) => p,
            None => {
                return answered(proxy_answer(
                    http::StatusCode::BAD_REQUEST,
                    "the request names no target port",
                    false,
                ))
            }
        }
    };
    // The admin port too: reached through the tunnel, a peer's request
    // would come from localhost, where the admin server trusts its callers.
    if port == cfg.inbound_port || port == cfg.outbound_port || port == cfg.admin_listen.port() {
        return answered(proxy_answer(
            http::StatusCode::BAD_REQUEST,
            &format!("port {port} is the proxy's own; refusing a loop"),
            false,
        ));
    }
    let live = ctx.live_now();
    if !live.authz.allows(port, Some(peer)) {
        warn!(client = %peer, server = %ctx.identity.local_id(), port, "refused by the port's authorization policy");
        return answered(proxy_answer(
            http::StatusCode::FORBIDDEN,
            &format!("{peer} is not allowed to reach port {port}"),
            false,
        ));
    }
    if !plain_connect {
        let max_fields = crate::http::max_fields(&live.config);
        return crate::http::inbound::from_peer(ctx, req, client, dst, port, mesh_peer, max_fields);
    }
    let ctx = ctx.clone();
    let peer = mesh_peer.clone();
    Box::pin(async move {
        match connect_app(&ctx, dst.ip(), port).await {
            Ok(app) => {
                let mut res = http::Response::new(crate::http::empty());
                let app_dst = SocketAddr::new(dst.ip(), port);
                res.extensions_mut().insert(Tunnel::new(move |stream| {
                    tunnel(ctx, stream, app, client, app_dst, peer)
                }));
                res
            }
            Err(e) => {
                debug!(%client, port, error = %e, "application connect failed");
                proxy_answer(
                    http::StatusCode::BAD_GATEWAY,
                    &format!("application port {port}: {e}"),
                    false,
                )
            }
        }
    })
}

/// A tunnel a peer proxy opened to the application at `dst`. The peer's
/// proxy carries a connection as opaque when its own configuration or its
/// detection says so, and that must not be a way around the HTTP path,
/// where the identity header is guarded: unless this proxy carries the port
/// as opaque too, the tunnel's first bytes are detected here as well, and
/// HTTP is served here, with the peer's verified identity. An application
/// that speaks first makes the tunnel opaque at once, so that its banner is
/// not held back.
async fn tunnel(
    ctx: Arc<Shared>,
    mut stream: crate::h2stream::StreamIo,
    mut app: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    peer: crate::http::inbound::Peer,
) {
    let idle = ctx.config.proxy.idle_timeout;
    let port = dst.port();
    let mut first = Vec::new();
    if !ctx.config.proxy.opaque_ports.contains(port) {
        first.reserve(1024);
        // A peek consumes nothing (and, unlike readiness, is never
        // spurious), and the tunnel's read gives back nothing when it is
        // dropped unfinished. An application that has spoken decides, as in
        // `settle`, unless it is an HTTP/2 server opening its side.
        let mut head = [0u8; 9];
        let mut h2_app = false;
        let idle_end = tokio::time::sleep(idle);
        tokio::pin!(idle_end);
        let spoke = loop {
            let spoke = tokio::select! {
                biased;
                peeked = app.peek(&mut head), if !h2_app => peeked.map(Some),
                read = stream.read_buf(&mut first) => read.map(|_| None),
                () = &mut idle_end => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "neither side spoke within the idle timeout",
                )),
            };
            match spoke {
                Ok(Some(n)) if crate::detect::opens_http2(&head[..n]) => h2_app = true,
                Ok(Some(_)) => break Ok(false),
                Ok(None) => break Ok(true),
                Err(e) => break Err(e),
            }
        };
        match spoke {
            Ok(true) if !first.is_empty() => {
                let proto =
                    crate::detect::read_until_known(&mut stream, &mut first, Side::Server).await;
                if proto != Protocol::Opaque {
                    drop(app);
                    let io = crate::rewind::Rewind::new(first, stream);
                    crate::http::inbound::serve_tunnelled(ctx, io, client, dst, proto, peer).await;
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                debug!(peer = %peer.id, port, error = %e, "mesh stream ended");
                return;
            }
        }
    }
    let watch = !ctx.config.proxy.opaque_ports.contains(port);
    let mut stream = Guarded::new(stream, watch, client);
    if let Err(e) = stream.check(&first) {
        ctx.metrics.opaque_http_closed();
        debug!(peer = %peer.id, port, error = %e, "mesh stream closed");
        return;
    }
    if !first.is_empty() {
        if let Err(e) = app.write_all(&first).await {
            debug!(peer = %peer.id, port, error = %e, "application connection ended");
            return;
        }
    }
    drop(first);
    match relay(stream, app, idle).await {
        Ok(t) => {
            debug!(peer = %peer.id, port, sent = t.sent, received = t.received, "mesh stream closed")
        }
        Err(e) => {
            if crate::line_guard::closed_by_guard(&e) {
                ctx.metrics.opaque_http_closed();
            }
            debug!(peer = %peer.id, port, error = %e, "mesh stream ended")
        }
    }
}

/// Why a client outside the mesh may not reach a port.
#[derive(Clone, Copy)]
enum Refusal {
    /// `proxy.mode` is strict.
    Strict,
    /// The port is the proxy's own.
    OwnPort,
    /// The port's authorization wants an identity.
    Unauthorized,
}

impl Refusal {
    /// The reason the connection's log records.
    fn reason(self) -> &'static str {
        match self {
            Refusal::Strict => "strict_mode",
            Refusal::OwnPort => "plaintext_on_mesh_port",
            Refusal::Unauthorized => "unauthorized",
        }
    }
}

/// Whether a client outside the mesh may reach `port`; `None` when it may.
fn refusal_of_outsiders(ctx: &Shared, port: u16) -> Option<Refusal> {
    let cfg = &ctx.config.proxy;
    if cfg.mode == InboundMode::Strict {
        Some(Refusal::Strict)
    } else if port == cfg.inbound_port || port == cfg.admin_listen.port() {
        Some(Refusal::OwnPort)
    } else if !ctx.live_now().authz.allows(port, None) {
        Some(Refusal::Unauthorized)
    } else {
        None
    }
}

/// A connection from outside the mesh.
async fn plaintext(
    ctx: Arc<Shared>,
    sock: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    proto: Protocol,
    app: Option<(TcpStream, usize)>,
) {
    let cfg = &ctx.config.proxy;
    let meter = ctx.conn_meter(Direction::Inbound, client, dst, protocol_label(proto));
    meter.set_peer(None);
    if let Some(refusal) = refusal_of_outsiders(&ctx, dst.port()) {
        match refusal {
            Refusal::Strict => {
                warn!(%client, port = dst.port(), "refusing a client outside the mesh: proxy.mode is strict")
            }
            Refusal::OwnPort => debug!(%client, "plaintext to the proxy's own port; closing"),
            Refusal::Unauthorized => {
                warn!(%client, server = %ctx.identity.local_id(), port = dst.port(), "refused an unauthenticated client: the port's policy does not allow it")
            }
        }
        meter.fail(refusal.reason());
        socket::reset(sock);
        return;
    }
    if proto != Protocol::Opaque {
        // Boxed for the same reason as the mesh server above.
        Box::pin(crate::http::inbound::serve_plain(
            ctx, sock, client, dst, proto, meter,
        ))
        .await;
        return;
    }
    let app = match app {
        Some((app, passed)) => {
            meter.count_written(passed);
            app
        }
        None => match connect_app(&ctx, dst.ip(), dst.port()).await {
            Ok(app) => app,
            Err(e) => {
                debug!(%client, port = dst.port(), error = %e, "application connect failed");
                meter.fail("application_connect_failed");
                socket::reset(sock);
                return;
            }
        },
    };
    let watch = !cfg.opaque_ports.contains(dst.port());
    let sock = Guarded::new(Metered::new(sock, meter.clone()), watch, client);
    match relay(sock, app, cfg.idle_timeout).await {
        Ok(t) => {
            debug!(%client, port = dst.port(), sent = t.sent, received = t.received, "plaintext inbound connection closed")
        }
        Err(e) => {
            if crate::line_guard::closed_by_guard(&e) {
                ctx.metrics.opaque_http_closed();
                meter.fail("http_in_opaque_bytes");
            }
            debug!(%client, port = dst.port(), error = %e, "plaintext inbound connection ended")
        }
    }
}

/// Connects to the application; [`app_targets`] says where.
async fn connect_app(
    ctx: &Shared,
    ip: IpAddr,
    port: u16,
) -> Result<TcpStream, socket::ConnectError> {
    let targets = app_targets(&ctx.config, ip, port);
    ctx.clients().dial().connect(&targets).await
}

/// Where the application serving `port` may listen, in the order tried.
/// `ip` is the address the client used.
///
/// On a port the rules capture, localhost comes first and the client's
/// address second, for applications bound only to the pod IP. Forwarding
/// there to localhost exposes nothing new: any client that can reach the
/// port already lands on the proxy.
///
/// A port the rules do not capture is reached from the network only on
/// the address itself, never on localhost, and the mesh must not widen
/// that. A peer that dials the mesh port can name any port, so without
/// this rule it could reach a service the host bound to 127.0.0.1 only
/// (on a plain host under `legate run`, which captures no inbound port
/// unless told to, that is every local service).
pub(crate) fn app_targets(config: &Config, ip: IpAddr, port: u16) -> Targets {
    let own = SocketAddr::new(ip, port);
    if ip.is_loopback() {
        return Targets::one(own);
    }
    if !config
        .init
        .captures_inbound(port, config.proxy.admin_listen.port())
    {
        return Targets::one(own);
    }
    let loopback = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let local = SocketAddr::new(loopback, port);
    if ip.is_unspecified() {
        Targets::one(local)
    } else {
        Targets::two(local, own)
    }
}

/// Per-port authorization: who may reach which application port.
pub struct Authz {
    policies: Vec<legate_config::PortPolicy>,
    trust_domain: legate_config::TrustDomain,
    mode: InboundMode,
}

impl Authz {
    pub fn new(cfg: &legate_config::Config) -> Self {
        Authz {
            policies: cfg.proxy.authz.clone(),
            trust_domain: cfg.identity.trust_domain.clone(),
            mode: cfg.proxy.mode,
        }
    }

    /// Whether `peer` (`None`: a client outside the mesh) may reach `port`.
    /// Without a policy for the port, any verified mesh identity may, and
    /// outside clients may in permissive mode. With one, only those it
    /// lists may.
    pub fn allows(&self, port: u16, peer: Option<&SpiffeId>) -> bool {
        match self.policies.iter().find(|p| p.ports.contains(port)) {
            Some(policy) => policy
                .allow
                .iter()
                .any(|rule| rule.admits(peer, &self.trust_domain)),
            None => match peer {
                Some(id) => id.trust_domain() == self.trust_domain.as_str(),
                None => self.mode == InboundMode::Permissive,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_defaults_and_policies() {
        let mut cfg = legate_config::Config::default();
        cfg.proxy.authz = vec![legate_config::PortPolicy {
            ports: "8080".parse().unwrap(),
            allow: vec!["spiffe://legate.local/ns/shop/*".parse().unwrap()],
        }];
        let authz = Authz::new(&cfg);
        let shop: SpiffeId = "spiffe://legate.local/ns/shop/sa/web".parse().unwrap();
        let other: SpiffeId = "spiffe://legate.local/ns/bank/sa/web".parse().unwrap();
        let foreign: SpiffeId = "spiffe://elsewhere/ns/shop/sa/web".parse().unwrap();
        assert!(authz.allows(8080, Some(&shop)));
        assert!(
            !authz.allows(8080, Some(&other)),
            "deny by default once a port has a policy"
        );
        assert!(!authz.allows(8080, None));
        assert!(
            authz.allows(9090, Some(&other)),
            "no policy: any mesh identity"
        );
        assert!(!authz.allows(9090, Some(&foreign)));
        assert!(
            authz.allows(9090, None),
            "permissive lets outside clients in"
        );
        cfg.proxy.mode = InboundMode::Strict;
        assert!(!Authz::new(&cfg).allows(9090, None));
    }

    #[test]
    fn only_a_client_hello_with_the_mesh_alpn_is_mesh() {
        // A real ClientHello from rustls, with and without the mesh ALPN.
        fn hello(alpn: &[&[u8]]) -> Vec<u8> {
            let mut roots = rustls::RootCertStore::empty();
            roots.roots.clear();
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            let mut conn =
                rustls::ClientConnection::new(Arc::new(cfg), "example.org".try_into().unwrap())
                    .unwrap();
            let mut out = Vec::new();
            conn.write_tls(&mut out).unwrap();
            out
        }
        assert!(offers_mesh_alpn(&hello(&[b"h2", MESH_ALPN])));
        assert!(!offers_mesh_alpn(&hello(&[b"h2"])));
        assert!(!offers_mesh_alpn(&hello(&[])));
        assert!(!offers_mesh_alpn(b"GET / HTTP/1.1\r\n\r\n"));
    }
}
