//! `legate ca serve`: the CA's HTTPS API.
//!
//! The API is small (see [`crate::api`]) and faces every workload, so it is
//! built to keep serving whatever one client does:
//!
//! - each phase has a deadline (`ca.request_timeout`): the TLS handshake,
//!   reading the request head (hyper's header read timeout, which also
//!   covers idle keep-alive connections), and the whole request including
//!   its body. A client trickling one byte per second is cut off when its
//!   deadline passes; it holds one task and one socket until then, nothing
//!   more;
//! - bodies are bounded (`ca.max_body`), checked against `Content-Length`
//!   before reading and enforced while reading;
//! - connections are capped ([`MAX_CONNECTIONS`]), and so are those from
//!   one source address ([`MAX_CONNECTIONS_PER_IP`]); beyond a cap new ones
//!   are closed at once rather than queued, so a flood cannot starve the
//!   clients already being served, and one client cannot take every slot;
//! - refusals are logged at most once per [`REFUSAL_LOG_INTERVAL`], with a
//!   count, so a flood does not flood the log too;
//! - every failure is a JSON [`ApiError`] whose `reason` says what to fix.
//!
//! The API's own certificate comes from the CA's chain, with the SPIFFE ID
//! `spiffe://<td>/legate/ca` (plus `ca.dns_names`), and is renewed at
//! half-life. Client certificates are optional (bootstrap clients have
//! none); when present they are verified against the bundle and authenticate
//! renewals.
//!
//! The CA directory is re-read when `state.json` changes (after `legate ca
//! rotate`), so rotation needs no restart.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use legate_config::{CaConfig, SpiffeId};
use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::api::{self, ApiError, IssueRequest, IssueResponse};
use crate::auth::{self, AuthError, AuthRequest, Authenticator, BootstrapTokens, Renewal};
use crate::credentials::{Credentials, CredentialsHandle};
use crate::issuer::{self, CsrError};
use crate::kubernetes::{KubernetesOptions, TokenReviews};
use crate::store::{Authority, Stamp};
use crate::tls::{self, ClientAuth, PeerMatcher};
use crate::token::TokenKey;
use crate::{pki, CaError};

/// Most connections served at once. A CA sees a renewal per workload per
/// half-life, so this is far above normal load; past it, connections are
/// refused rather than queued.
pub const MAX_CONNECTIONS: usize = 4096;

/// Most connections served at once for one source IP. A workload opens one
/// connection per renewal and closes it, so a handful is normal; in
/// Kubernetes every pod has its own IP, so with this cap one misbehaving
/// pod (or a buggy client leaking idle connections) cannot hold the
/// [`MAX_CONNECTIONS`] slots every other workload needs to renew. It is
/// well above one node's worth of pods sharing a host-network or
/// SNAT'd address renewing at the same moment, which retry anyway.
pub const MAX_CONNECTIONS_PER_IP: usize = 64;

/// Shortest time between two log lines about refused connections. Each
/// refusal costs the client a retry, not the operator a log line: a client
/// hammering a full server would otherwise write one line per attempt.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A bound, not yet running, CA API server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
}

struct Shared {
    dir: PathBuf,
    cfg: CaConfig,
    authority: ArcSwap<Authority>,
    /// Held while re-reading the directory, so only one request does it.
    reloading: Mutex<()>,
    /// The API's certificate and the bundle client certificates are checked
    /// against.
    creds: CredentialsHandle,
    /// When the API certificate should be renewed, and by which generation
    /// it was signed.
    server_cert: Mutex<(Instant, u32)>,
    tokens: Arc<ArcSwap<TokenKey>>,
    authenticators: Vec<Box<dyn Authenticator>>,
}

impl Server {
    /// Loads the CA from `dir` and binds `cfg.listen`.
    pub async fn bind(dir: &Path, cfg: &CaConfig) -> Result<Self, CaError> {
        let authority = Authority::load(dir)?;
        let tokens = Arc::new(ArcSwap::from_pointee(authority.token_key().clone()));
        let td = authority.trust_domain().clone();
        // Kubernetes first: it claims only JWTs, which the bootstrap method
        // would refuse as malformed.
        let mut authenticators: Vec<Box<dyn Authenticator>> = Vec::new();
        if let Some(opts) = KubernetesOptions::from_config(cfg)? {
            authenticators.push(Box::new(TokenReviews::new(opts, td.clone())?));
        }
        authenticators.push(Box::new(BootstrapTokens::new(tokens.clone())));
        authenticators.push(Box::new(Renewal));
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            cfg: cfg.clone(),
            authority: ArcSwap::from_pointee(authority),
            reloading: Mutex::new(()),
            creds: CredentialsHandle::new(),
            server_cert: Mutex::new((Instant::now(), 0)),
            tokens,
            authenticators,
        });
        shared.renew_server_cert()?;
        let server_config = tls::server_config(
            &shared.creds,
            ClientAuth::Optional(PeerMatcher::TrustDomain(td)),
            vec![b"http/1.1".to_vec()],
        );
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| CaError::Bind {
                addr: cfg.listen,
                source,
            })?;
        Ok(Server {
            listener,
            shared,
            acceptor: TlsAcceptor::from(server_config),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, CaError> {
        self.listener
            .local_addr()
            .map_err(|e| CaError::io("read the address of", "the listener", e))
    }

    /// Serves until `shutdown` completes; then stops accepting and closes
    /// open connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), CaError> {
        let Server {
            listener,
            shared,
            acceptor,
        } = self;
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let per_ip = PerIp::new(MAX_CONNECTIONS_PER_IP);
        let mut refused_full = RefusalLog::new(REFUSAL_LOG_INTERVAL);
        let mut refused_ip = RefusalLog::new(REFUSAL_LOG_INTERVAL);
        let mut conns = JoinSet::new();
        let maintenance = tokio::spawn(maintain(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of file descriptors and the like: back off
                            // briefly instead of spinning.
                            warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // The per-IP slot first: a client at its own cap must
                    // not take one of the shared slots, even briefly.
                    let Some(slot) = per_ip.acquire(peer.ip()) else {
                        if let Some(n) = refused_ip.refused(Instant::now()) {
                            warn!(
                                %peer,
                                refused = n,
                                "refusing connections from {}: it already has \
                                 {MAX_CONNECTIONS_PER_IP} open; {n} refused since the last such \
                                 line (from this or other addresses at their cap); look for a \
                                 client there leaking connections",
                                peer.ip()
                            );
                        }
                        continue;
                    };
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        if let Some(n) = refused_full.refused(Instant::now()) {
                            warn!(
                                %peer,
                                refused = n,
                                "refusing connections: {MAX_CONNECTIONS} already open; {n} \
                                 refused since the last such line"
                            );
                        }
                        continue;
                    };
                    let shared = shared.clone();
                    let acceptor = acceptor.clone();
                    conns.spawn(async move {
                        serve_connection(shared, acceptor, tcp, peer).await;
                        drop(permit);
                        drop(slot);
                    });
                }
            }
            while conns.try_join_next().is_some() {}
        }
        maintenance.abort();
        conns.shutdown().await;
        Ok(())
    }
}

/// Open connections per source IP, capped.
#[derive(Clone)]
struct PerIp {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    fn new(max: usize) -> Self {
        PerIp {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `ip`, or `None` when it already
    /// has `max` open.
    fn acquire(&self, ip: IpAddr) -> Option<IpSlot> {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; one
        // client is one key however it arrives.
        let ip = ip.to_canonical();
        // The lock guards a counter update and nothing that can panic, so
        // a poisoned map is still consistent.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            open: self.open.clone(),
        })
    }
}

/// One connection's place in [`PerIp`], given back when dropped.
struct IpSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Forget addresses with nothing open, so the map holds the
                // clients connected now, not every client ever seen.
                open.remove(&self.ip);
            }
        }
    }
}

/// Rate limit for the log lines about refused connections: the first
/// refusal is logged, then at most one line per `interval`, carrying how
/// many were refused since the previous line.
struct RefusalLog {
    interval: Duration,
    last: Option<Instant>,
    /// Refusals since the last line, this one included once counted.
    unlogged: u64,
}

impl RefusalLog {
    fn new(interval: Duration) -> Self {
        RefusalLog {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts a refusal at `now`; `Some(n)` when a line should be written
    /// now, `n` being the refusals it reports.
    fn refused(&mut self, now: Instant) -> Option<u64> {
        self.unlogged = self.unlogged.saturating_add(1);
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Binds and serves until SIGTERM or Ctrl-C.
pub async fn serve(dir: &Path, cfg: &CaConfig) -> Result<(), CaError> {
    let server = Server::bind(dir, cfg).await?;
    let addr = server.local_addr()?;
    let td = server.shared.authority.load().trust_domain().clone();
    info!(%addr, trust_domain = %td, dir = %dir.display(), "CA API listening");
    server.run(shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    info!("shutting down");
}

/// Re-reads the directory when it changes and renews the API certificate.
async fn maintain(shared: Arc<Shared>) {
    let tick = (shared.cfg.cert_ttl / 8).clamp(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        shared.refresh();
        let due = shared
            .server_cert
            .lock()
            .map(|g| g.0 <= Instant::now())
            .unwrap_or(true);
        if due {
            if let Err(e) = shared.renew_server_cert() {
                warn!("cannot renew the CA API certificate, keeping the current one: {e}");
            }
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let timeout = shared.cfg.request_timeout;
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out after {timeout:?}");
            return;
        }
    };
    let client_id = tls::peer_id(stream.get_ref().1);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let client_id = client_id.clone();
        async move {
            let resp = match tokio::time::timeout(
                shared.cfg.request_timeout,
                shared.handle(req, client_id.as_ref(), peer),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Failure::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request took longer than ca.request_timeout ({}); send it whole and promptly",
                        pki::human(shared.cfg.request_timeout)
                    ),
                )
                .response(),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(%peer, "connection ended: {e}");
    }
}

/// An API error on its way out.
struct Failure {
    status: StatusCode,
    body: ApiError,
}

impl Failure {
    fn new(status: StatusCode, code: &str, reason: impl Into<String>) -> Self {
        Failure {
            status,
            body: ApiError {
                error: code.into(),
                reason: reason.into(),
            },
        }
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        respond(self.status, "application/json", body)
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        Failure::new(e.status(), e.code(), e.to_string())
    }
}

impl From<CsrError> for Failure {
    fn from(e: CsrError) -> Self {
        let status = match e {
            CsrError::Malformed(_)
            | CsrError::BadSignature
            | CsrError::WeakKey(_)
            | CsrError::MissingIdentity(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::FORBIDDEN,
        };
        Failure::new(status, e.code(), e.to_string())
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

impl Shared {
    /// Reloads the CA directory if `state.json` changed. A broken directory
    /// is logged and the loaded CA kept: serving on is better than failing
    /// every request.
    fn refresh(&self) {
        let stamp = Stamp::of(&self.dir);
        if &stamp == self.authority.load().stamp() {
            return;
        }
        let Ok(_guard) = self.reloading.try_lock() else {
            return;
        };
        if &Stamp::of(&self.dir) == self.authority.load().stamp() {
            return;
        }
        match Authority::load(&self.dir) {
            Ok(a) => {
                info!(generation = a.active().generation(), roots = a.bundle().certs().len(), "reloaded the CA directory");
                self.tokens.store(Arc::new(a.token_key().clone()));
                self.authority.store(Arc::new(a));
                if let Err(e) = self.renew_server_cert() {
                    warn!("cannot renew the CA API certificate after reload: {e}");
                }
            }
            Err(e) => warn!("the CA directory changed but cannot be loaded; still serving the previous state: {e}"),
        }
    }

    /// Issues the API's own certificate and installs it.
    fn renew_server_cert(&self) -> Result<(), CaError> {
        let a = self.authority.load();
        let signer = a.server_signer();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let id = crate::ca_server_id(a.trust_domain());
        let now = SystemTime::now();
        let issued = signer.issue(
            &key,
            &id,
            &self.cfg.dns_names,
            self.cfg.cert_ttl,
            self.cfg.backdate,
            now,
        )?;
        let mut chain = vec![issued.leaf.clone()];
        chain.extend(signer.chain().iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let creds = Credentials::new(chain, key, a.bundle().clone())?;
        let half = issued.not_after.duration_since(now).unwrap_or_default() / 2;
        if let Ok(mut g) = self.server_cert.lock() {
            *g = (Instant::now() + half, signer.generation());
        }
        self.creds.store(creds);
        Ok(())
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        client: Option<&SpiffeId>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        self.refresh();
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, api::PATH_HEALTH) => respond(
                StatusCode::OK,
                "application/json",
                &br#"{"status":"ok"}"#[..],
            ),
            (&Method::GET, api::PATH_BUNDLE) => {
                let pem = self.authority.load().bundle_pem().to_owned();
                respond(StatusCode::OK, "application/x-pem-file", pem)
            }
            (&Method::POST, api::PATH_ISSUE) => match self.issue(req, client).await {
                Ok(r) => r,
                Err(f) => {
                    info!(%peer, client = client.map(SpiffeId::as_str), error = %f.body.error, "refused: {}", f.body.reason);
                    f.response()
                }
            },
            (_, api::PATH_HEALTH | api::PATH_BUNDLE | api::PATH_ISSUE) => Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!(
                    "{} is not allowed here; GET {} and {}, POST {}",
                    req.method(),
                    api::PATH_HEALTH,
                    api::PATH_BUNDLE,
                    api::PATH_ISSUE
                ),
            )
            .response(),
            _ => Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no such endpoint {path:?}; the API has GET {} and {}, POST {}",
                    api::PATH_HEALTH,
                    api::PATH_BUNDLE,
                    api::PATH_ISSUE
                ),
            )
            .response(),
        }
    }

    async fn issue(
        &self,
        req: Request<Incoming>,
        client: Option<&SpiffeId>,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let bearer = match req.headers().get(AUTHORIZATION) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.strip_prefix("Bearer "))
                    .map(|s| s.trim().to_owned())
                    .ok_or_else(|| {
                        Failure::new(
                            StatusCode::UNAUTHORIZED,
                            "unauthenticated",
                            "the Authorization header must be `Bearer <token>`",
                        )
                    })?,
            ),
        };
        let body = self.read_body(req).await?;
        let request: IssueRequest = serde_json::from_slice(&body).map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                format!("the body must be JSON {{\"csr\": \"<PEM>\"}}: {e}"),
            )
        })?;

        let who = auth::authenticate(
            &self.authenticators,
            AuthRequest {
                bearer: bearer.as_deref(),
                peer: client,
            },
        )
        .await?;
        let authority = self.authority.load_full();
        if who.id.trust_domain() != authority.trust_domain().as_str() {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                "wrong_trust_domain",
                format!(
                    "{} is outside this CA's trust domain {}",
                    who.id,
                    authority.trust_domain()
                ),
            ));
        }
        let der = issuer::csr_der_from_pem(&request.csr)?;
        let key = issuer::check_csr(&der, &who.id)?;

        let cfg = self.cfg.clone();
        let id = who.id.clone();
        let signed = tokio::task::spawn_blocking(move || {
            let r = authority.issue(&key, &id, &cfg, SystemTime::now());
            (r, authority)
        })
        .await;
        let (result, authority) = signed.map_err(|_| internal("the signing task failed"))?;
        let (issued, chain) = result.map_err(|e| {
            warn!("signing failed: {e}");
            internal(&e.to_string())
        })?;
        info!(
            id = %who.id,
            method = who.method,
            serial = %issued.serial,
            generation = authority.active().generation(),
            not_after = pki::unix_secs(issued.not_after),
            "issued"
        );
        let resp = IssueResponse {
            spiffe_id: who.id.to_string(),
            certificate_chain: pki::certs_pem(&chain),
            bundle: authority.bundle_pem().to_owned(),
            not_before: pki::unix_secs(issued.not_before),
            not_after: pki::unix_secs(issued.not_after),
            serial: issued.serial,
        };
        let body = serde_json::to_vec(&resp).map_err(|e| internal(&e.to_string()))?;
        Ok(respond(StatusCode::OK, "application/json", body))
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Failure> {
        let max = self.cfg.max_body.as_usize();
        let too_large = || {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than ca.max_body ({}); a CSR request is about 1KiB",
                    self.cfg.max_body
                ),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > DRAIN_LIMIT as u64) {
            // Far too large to be worth reading even to discard it.
            return Err(too_large());
        }
        // Read up to the limit; past it, keep reading (and discarding) up to
        // DRAIN_LIMIT so that the client, still writing, receives the 413
        // instead of a connection reset. The request deadline still applies.
        let mut body = req.into_body();
        let mut buf = BytesMut::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Failure::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_request",
                    format!("cannot read the body: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                total = total.saturating_add(data.len());
                if total <= max {
                    buf.extend_from_slice(&data);
                } else if total > DRAIN_LIMIT {
                    break;
                }
            }
        }
        if total > max {
            return Err(too_large());
        }
        Ok(buf.freeze())
    }
}

/// Bodies past `ca.max_body` are read and discarded up to this size, so the
/// client hears why it was refused.
const DRAIN_LIMIT: usize = 1024 * 1024;

fn internal(detail: &str) -> Failure {
    Failure::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("the CA could not sign: {detail}; see the CA's log"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpSocket;

    /// A TCP connection to `server` from the loopback address `from`.
    async fn connect_from(from: [u8; 4], server: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(SocketAddr::from((from, 0)))
            .expect("bind a loopback source address");
        socket.connect(server).await.expect("connect to the CA")
    }

    /// Whether the server closed `conn` rather than waiting for a TLS
    /// ClientHello on it.
    async fn closed_by_server(conn: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_connection() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let cfg = CaConfig {
            listen: "127.0.0.1:0".parse().expect("an address"),
            // Long enough that held connections are not cut during the test.
            request_timeout: Duration::from_secs(30),
            ..CaConfig::default()
        };
        let td = "test.local".parse().expect("a trust domain");
        crate::store::init(dir.path(), &td, &cfg, None, false).expect("a CA directory");
        let server = Server::bind(dir.path(), &cfg).await.expect("bind");
        let addr = server.local_addr().expect("an address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));

        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_IP {
            held.push(connect_from([127, 0, 0, 2], addr).await);
        }
        let mut one_more = connect_from([127, 0, 0, 2], addr).await;
        assert!(
            closed_by_server(&mut one_more).await,
            "a connection past the per-address cap was kept open"
        );
        let mut other = connect_from([127, 0, 0, 3], addr).await;
        assert!(
            !closed_by_server(&mut other).await,
            "another address was refused while one address held its cap"
        );
        for conn in &mut held[..4] {
            assert!(
                !closed_by_server(conn).await,
                "a connection within the cap was closed"
            );
        }

        // Closing connections gives the address its slots back.
        held.truncate(MAX_CONNECTIONS_PER_IP - 1);
        drop(one_more);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = connect_from([127, 0, 0, 2], addr).await;
        assert!(
            !closed_by_server(&mut again).await,
            "a slot freed by a closed connection was not given back"
        );

        let _ = stop.send(());
        let _ = task.await;
    }

    #[test]
    fn per_ip_slots_count_v4_mapped_addresses_as_one() {
        let per_ip = PerIp::new(2);
        let v4: IpAddr = "10.0.0.1".parse().expect("an address");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("an address");
        let a = per_ip.acquire(v4).expect("first");
        let _b = per_ip.acquire(mapped).expect("second");
        assert!(per_ip.acquire(v4).is_none());
        drop(a);
        assert!(per_ip.acquire(mapped).is_some());
    }

    #[test]
    fn refusals_are_logged_once_per_interval_with_a_count() {
        let mut log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.refused(t0), Some(1), "the first refusal is logged");
        for i in 1..=99 {
            assert_eq!(log.refused(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(
            log.refused(t0 + Duration::from_secs(10)),
            Some(100),
            "the next line counts every refusal since the last one"
        );
        assert_eq!(log.refused(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.refused(t0 + Duration::from_secs(25)), Some(2));
    }
}
