//! Prometheus metrics, served by the admin server at `/metrics` in the
//! Prometheus text format (version 0.0.4).
//!
//! Every counter, gauge and histogram here is a plain atomic owned by the
//! proxy; [`prometheus_client`] only does the encoding, at scrape time. The
//! request path never allocates or locks for metrics: fixed label sets are
//! array indices, and the handles of the others (a peer identity, a route)
//! are resolved once per connection or held by the live configuration.
//! State that already exists elsewhere (circuit breakers, limits, the pool,
//! the certificate) is read when scraped rather than mirrored.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `legate_tcp_connections_opened_total` | counter | `direction`, `peer` |
//! | `legate_tcp_connections_closed_total` | counter | `direction`, `peer` |
//! | `legate_tcp_connections_active` | gauge | `direction`, `peer` |
//! | `legate_tcp_read_bytes_total` | counter | `direction`, `peer` |
//! | `legate_tcp_write_bytes_total` | counter | `direction`, `peer` |
//! | `legate_tcp_connection_duration_seconds` | histogram | `direction`, `peer` |
//! | `legate_tls_handshakes_total` | counter | `direction` |
//! | `legate_tls_handshake_failures_total` | counter | `direction`, `reason` |
//! | `legate_protocol_detections_total` | counter | `direction`, `protocol` |
//! | `legate_http_requests_total` | counter | `direction`, `method`, `status_class` |
//! | `legate_http_request_duration_seconds` | histogram | `direction`, `destination` |
//! | `legate_http_retries_total` | counter | `route` |
//! | `legate_http_retry_successes_total` | counter | `route` |
//! | `legate_http_retries_budget_exhausted_total` | counter | `route` |
//! | `legate_http_limit_rejections_total` | counter | `route`, `limit` |
//! | `legate_http_breaker_open_total` | counter | `route` |
//! | `legate_http_breaker_transitions_total` | counter | `route`, `to` |
//! | `legate_http_breakers` | gauge | `route`, `state` |
//! | `legate_http_pending_requests` | gauge | `route` |
//! | `legate_http_in_flight_requests` | gauge | `route` |
//! | `legate_pool_connections` | gauge | |
//! | `legate_own_connections` | gauge | |
//! | `legate_identity_cert_expiry_timestamp_seconds` | gauge | |
//! | `legate_identity_cert_renewals_total` | counter | |
//! | `legate_identity_cert_renewal_failures_total` | counter | |
//! | `legate_access_log_dropped_total` | counter | |
//! | `legate_opaque_http_closed_total` | counter | |
//! | `legate_config_reloads_total` | counter | `result` |
//! | `legate_draining` | gauge | |
//!
//! **Labels and their bounds.**
//!
//! - `direction`: `outbound` (the application's own connections) or
//!   `inbound` (connections to it).
//! - `peer`: TCP metrics count the connections the proxy *accepts* (from the
//!   application on outbound, from a client on inbound), labelled with the
//!   SPIFFE ID at the other end of the mesh hop: the server's proxy for an
//!   outbound connection carried over mTLS (for an HTTP connection, the
//!   peer of its first request), the client's proxy for an inbound one;
//!   `none` when the connection is plaintext, `unknown` when it closed
//!   before the proxy knew. Identities are bounded by the mesh, and the
//!   first [`MAX_PEERS`] distinct ones per direction get their own series;
//!   any further identity is counted under `other`, so a misbehaving peer
//!   set cannot grow the output without bound. Bytes are those of the
//!   accepted socket: the application's own bytes on outbound, and on
//!   inbound the TLS records from the peer proxy (or the plaintext of a
//!   client outside the mesh). They are counted as they move, so
//!   long-lived connections show their traffic before they close.
//! - `reason` (TLS): `handshake_failed`, `handshake_timeout`, `not_mesh`
//!   (the peer agreed to no mesh protocol), `no_identity` (a certificate
//!   without a SPIFFE ID).
//! - `protocol` (detection): `http1`, `http2`, `opaque`, or `skipped` for
//!   ports listed in `proxy.opaque_ports`.
//! - `method`: `GET`, `HEAD`, `POST`, `PUT`, `DELETE`, `PATCH`, `OPTIONS`,
//!   `CONNECT`, `TRACE`, else `other`. `status_class`: `1xx` to `5xx`. The
//!   proxy's own answers (a 503 from a breaker, say) count with their status.
//! - `destination` (latency): on outbound, the HTTP policy that served the
//!   request, which is the `name` of its `[[proxy.http.routes]]` entry (or
//!   `routes[N]`) or `default`; on inbound, the application port. Raw
//!   addresses never become labels. Ports beyond the first [`MAX_PORTS`]
//!   fold into `other`.
//! - `route`: the policy name as above.
//! - `limit`: `max_connections`, `max_pending`, `max_in_flight`.
//! - `state` (breakers): `closed`, `open`, `half_open`; the gauge counts the
//!   endpoints the policy tracks in each state. `to` is the state entered.
//!
//! Latency is measured to the response headers, as Linkerd does: a
//! streaming response's body can last as long as the client likes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::policy::{BreakerState, HttpPolicy, LimitKind};

/// Distinct peer identities per direction with their own series.
pub const MAX_PEERS: usize = 256;
/// Distinct inbound application ports with their own latency series.
pub const MAX_PORTS: usize = 64;

/// Which side of the proxy a connection or request is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound = 0,
    Inbound = 1,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

const DIRECTIONS: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

/// Latency buckets, in seconds: 1 ms to 30 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
];
/// Connection duration buckets, in seconds: 10 ms to an hour.
const DURATION_BUCKETS: [f64; 12] = [
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// A lock-free histogram with fixed buckets; the sum is kept in
/// microseconds so that it is one atomic add.
#[derive(Debug)]
pub struct Histo {
    bounds: &'static [f64],
    /// One count per bound, plus the overflow (`+Inf`) bucket.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histo {
    fn new(bounds: &'static [f64]) -> Self {
        Histo {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn encode(&self, mut enc: prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        enc.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

/// TCP counters of one `(direction, peer)` series.
#[derive(Debug)]
pub struct PeerStats {
    opened: AtomicU64,
    closed: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
    duration: Histo,
}

impl PeerStats {
    fn new() -> Self {
        PeerStats {
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            duration: Histo::new(&DURATION_BUCKETS),
        }
    }

    pub(crate) fn add_read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn open(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn close(&self, lasted: Duration) {
        self.duration.observe(lasted);
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The peer series of one direction, bounded.
#[derive(Debug, Default)]
struct Peers {
    by_id: Mutex<Vec<(String, Arc<PeerStats>)>>,
}

impl Peers {
    fn get(&self, id: &str) -> Arc<PeerStats> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = by_id.iter().find(|(k, _)| k == id) {
            return s.clone();
        }
        // `none`, `unknown` and `other` always fit, past the cap too.
        let special = |k: &str| matches!(k, "none" | "unknown" | "other");
        let identities = by_id.iter().filter(|(k, _)| !special(k)).count();
        if !special(id) && identities >= MAX_PEERS {
            drop(by_id);
            return self.get("other");
        }
        let s = Arc::new(PeerStats::new());
        by_id.push((id.to_owned(), s.clone()));
        s
    }

    fn snapshot(&self) -> Vec<(String, Arc<PeerStats>)> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The labels of one `legate_http_requests_total` series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodClass(u8);

const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

impl MethodClass {
    /// The method as labelled: its name, or `other`.
    pub fn as_str(self) -> &'static str {
        METHODS[usize::from(self.0)]
    }

    pub fn of(m: &http::Method) -> Self {
        let i = match *m {
            http::Method::GET => 0,
            http::Method::HEAD => 1,
            http::Method::POST => 2,
            http::Method::PUT => 3,
            http::Method::DELETE => 4,
            http::Method::PATCH => 5,
            http::Method::OPTIONS => 6,
            http::Method::CONNECT => 7,
            http::Method::TRACE => 8,
            _ => 9,
        };
        MethodClass(i)
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class(s: http::StatusCode) -> usize {
    (usize::from(s.as_u16() / 100)).clamp(1, 5) - 1
}

/// Per-route (outbound policy) or per-port (inbound) request state.
#[derive(Debug)]
pub struct RouteStats {
    pub(crate) latency: Histo,
    retries: AtomicU64,
    retry_successes: AtomicU64,
    budget_exhausted: AtomicU64,
    /// By [`LimitKind`]: connections, pending, in flight.
    limit_rejections: [AtomicU64; 3],
    breaker_open: AtomicU64,
}

impl RouteStats {
    fn new() -> Self {
        RouteStats {
            latency: Histo::new(&LATENCY_BUCKETS),
            retries: AtomicU64::new(0),
            retry_successes: AtomicU64::new(0),
            budget_exhausted: AtomicU64::new(0),
            limit_rejections: Default::default(),
            breaker_open: AtomicU64::new(0),
        }
    }

    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retry_succeeded(&self) {
        self.retry_successes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn budget_exhausted(&self) {
        self.budget_exhausted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn limit_rejected(&self, kind: LimitKind) {
        let i = match kind {
            LimitKind::Connections => 0,
            LimitKind::Pending => 1,
            LimitKind::InFlight => 2,
        };
        self.limit_rejections[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn breaker_refused(&self) {
        self.breaker_open.fetch_add(1, Ordering::Relaxed);
    }
}

/// TLS handshake failure reasons, in label order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    HandshakeFailed = 0,
    HandshakeTimeout = 1,
    NotMesh = 2,
    NoIdentity = 3,
}

const TLS_REASONS: [&str; 4] = [
    "handshake_failed",
    "handshake_timeout",
    "not_mesh",
    "no_identity",
];

/// Protocol detection outcomes, in label order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1 = 0,
    Http2 = 1,
    Opaque = 2,
    Skipped = 3,
}

const DETECTED: [&str; 4] = ["http1", "http2", "opaque", "skipped"];

/// What the pool reports: its connections, and its mTLS handshakes as
/// [`crate::pool::Pool::handshakes`] counts them.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStatus {
    pub connections: usize,
    /// Connections of one application connection each, to in-band
    /// destinations (see `crate::pool::Own`).
    pub own_connections: usize,
    pub handshakes: (u64, [u64; 3]),
}

/// What the identity reports for the certificate metrics.
#[derive(Debug, Clone, Default)]
pub struct CertStatus {
    pub not_after: Option<SystemTime>,
    pub renewals: u64,
    pub renewal_failures: u64,
}

/// Every metric the proxy keeps.
#[derive(Debug)]
pub struct Metrics {
    peers: [Peers; 2],
    tls_ok: [AtomicU64; 2],
    tls_failed: [[AtomicU64; 4]; 2],
    detected: [[AtomicU64; 4]; 2],
    requests: [[[AtomicU64; 5]; 10]; 2],
    /// Inbound latency by application port.
    ports: RwLock<HashMap<u16, Arc<RouteStats>>>,
    /// Outbound state by policy name; kept across reloads.
    routes: Mutex<HashMap<String, Arc<RouteStats>>>,
    pub(crate) access_dropped: AtomicU64,
    /// Connections [`crate::line_guard`] closed.
    opaque_http_closed: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    draining: AtomicI64,
    none: OnceLock<[Arc<PeerStats>; 2]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            peers: Default::default(),
            tls_ok: Default::default(),
            tls_failed: Default::default(),
            detected: Default::default(),
            requests: Default::default(),
            ports: RwLock::default(),
            routes: Mutex::default(),
            access_dropped: AtomicU64::new(0),
            opaque_http_closed: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            draining: AtomicI64::new(0),
            none: OnceLock::new(),
        }
    }

    /// The TCP series for `(dir, peer)`; resolve once per connection.
    pub fn peer(&self, dir: Direction, peer: &str) -> Arc<PeerStats> {
        if peer == "none" {
            let none = self
                .none
                .get_or_init(|| [self.peers[0].get("none"), self.peers[1].get("none")]);
            return none[dir as usize].clone();
        }
        self.peers[dir as usize].get(peer)
    }

    pub fn tls_handshake(&self, dir: Direction, result: Result<(), TlsFailure>) {
        match result {
            Ok(()) => self.tls_ok[dir as usize].fetch_add(1, Ordering::Relaxed),
            Err(r) => self.tls_failed[dir as usize][r as usize].fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Counts a connection [`crate::line_guard`] closed.
    pub fn opaque_http_closed(&self) {
        self.opaque_http_closed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn detected(&self, dir: Direction, what: Detected) {
        self.detected[dir as usize][what as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one finished request (its response headers).
    pub fn request(
        &self,
        dir: Direction,
        method: MethodClass,
        status: http::StatusCode,
        latency: Duration,
        route: &RouteStats,
    ) {
        self.requests[dir as usize][usize::from(method.0)][status_class(status)]
            .fetch_add(1, Ordering::Relaxed);
        route.latency.observe(latency);
    }

    /// The outbound state of the policy named `name`, created on first use
    /// and kept across reloads so that its counters never go back.
    pub fn route(&self, name: &str) -> Arc<RouteStats> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = routes.get(name) {
            return r.clone();
        }
        let r = Arc::new(RouteStats::new());
        routes.insert(name.to_owned(), r.clone());
        r
    }

    /// The inbound latency series of an application port.
    pub fn port(&self, port: u16) -> Arc<RouteStats> {
        if let Some(r) = self
            .ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
        {
            return r.clone();
        }
        let mut ports = self.ports.write().unwrap_or_else(|p| p.into_inner());
        let key = if ports.len() >= MAX_PORTS && !ports.contains_key(&port) {
            0
        } else {
            port
        };
        ports
            .entry(key)
            .or_insert_with(|| Arc::new(RouteStats::new()))
            .clone()
    }

    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn set_draining(&self) {
        self.draining.store(1, Ordering::Relaxed);
    }

    /// The text exposition, reading live state from `policies` (those in
    /// force), the pool's connection count and the certificate.
    pub fn render(
        self: &Arc<Self>,
        policies: Vec<Arc<HttpPolicy>>,
        pool: PoolStatus,
        cert: CertStatus,
    ) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: self.clone(),
            policies,
            pool,
            cert,
        }));
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// One scrape: the state it reads, held for the time of the scrape.
struct Scrape {
    metrics: Arc<Metrics>,
    policies: Vec<Arc<HttpPolicy>>,
    pool: PoolStatus,
    cert: CertStatus,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

/// Writes one metric family: its descriptor, then one sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a metric without labels.
fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    metric: M,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, kind)?)
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = &*self.metrics;

        let peers: Vec<(Direction, String, Arc<PeerStats>)> = DIRECTIONS
            .iter()
            .flat_map(|&d| {
                m.peers[d as usize]
                    .snapshot()
                    .into_iter()
                    .map(move |(id, s)| (d, id, s))
            })
            .collect();
        let tcp = |f: fn(&PeerStats) -> u64| {
            peers.iter().map(move |(d, id, s)| {
                (
                    [("direction", d.as_str()), ("peer", id.as_str())],
                    ConstCounter::new(f(s)),
                )
            })
        };
        family(
            &mut enc,
            "legate_tcp_connections_opened",
            "TCP connections accepted and carried, by the peer identity at the other end of the mesh hop",
            MetricType::Counter,
            tcp(|s| load(&s.opened)),
        )?;
        family(
            &mut enc,
            "legate_tcp_connections_closed",
            "TCP connections closed",
            MetricType::Counter,
            tcp(|s| load(&s.closed)),
        )?;
        family(
            &mut enc,
            "legate_tcp_connections_active",
            "TCP connections open now",
            MetricType::Gauge,
            peers.iter().map(|(d, id, s)| {
                let active = load(&s.opened).saturating_sub(load(&s.closed));
                (
                    [("direction", d.as_str()), ("peer", id.as_str())],
                    ConstGauge::new(i64::try_from(active).unwrap_or(i64::MAX)),
                )
            }),
        )?;
        family(
            &mut enc,
            "legate_tcp_read_bytes",
            "Bytes read from accepted connections",
            MetricType::Counter,
            tcp(|s| load(&s.read)),
        )?;
        family(
            &mut enc,
            "legate_tcp_write_bytes",
            "Bytes written to accepted connections",
            MetricType::Counter,
            tcp(|s| load(&s.written)),
        )?;
        {
            let mut h = enc.encode_descriptor(
                "legate_tcp_connection_duration_seconds",
                "How long closed TCP connections lasted",
                None,
                MetricType::Histogram,
            )?;
            for (d, id, s) in &peers {
                let labels = [("direction", d.as_str()), ("peer", id.as_str())];
                s.duration.encode(h.encode_family(&labels)?)?;
            }
        }

        family(
            &mut enc,
            "legate_tls_handshakes",
            "mTLS handshakes between proxies that succeeded",
            MetricType::Counter,
            DIRECTIONS.iter().map(|&d| {
                let ok = match d {
                    Direction::Outbound => self.pool.handshakes.0,
                    Direction::Inbound => load(&m.tls_ok[1]),
                };
                ([("direction", d.as_str())], ConstCounter::new(ok))
            }),
        )?;
        family(
            &mut enc,
            "legate_tls_handshake_failures",
            "mTLS handshakes between proxies that failed, by reason",
            MetricType::Counter,
            DIRECTIONS.iter().flat_map(|&d| {
                TLS_REASONS.iter().enumerate().map(move |(i, r)| {
                    let n = match d {
                        // The pool never sees a certificate without an ID:
                        // its verifier refuses it as a failed handshake.
                        Direction::Outbound => self.pool.handshakes.1.get(i).copied().unwrap_or(0),
                        Direction::Inbound => load(&m.tls_failed[1][i]),
                    };
                    (
                        [("direction", d.as_str()), ("reason", *r)],
                        ConstCounter::new(n),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "legate_protocol_detections",
            "Protocol detection outcomes of accepted connections",
            MetricType::Counter,
            DIRECTIONS.iter().flat_map(|&d| {
                DETECTED.iter().enumerate().map(move |(i, p)| {
                    (
                        [("direction", d.as_str()), ("protocol", *p)],
                        ConstCounter::new(load(&m.detected[d as usize][i])),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "legate_http_requests",
            "HTTP requests answered, by method and status class",
            MetricType::Counter,
            DIRECTIONS.iter().flat_map(|&d| {
                METHODS.iter().enumerate().flat_map(move |(mi, method)| {
                    STATUS_CLASSES
                        .iter()
                        .enumerate()
                        .filter(move |(si, _)| load(&m.requests[d as usize][mi][*si]) > 0)
                        .map(move |(si, class)| {
                            (
                                [
                                    ("direction", d.as_str()),
                                    ("method", *method),
                                    ("status_class", *class),
                                ],
                                ConstCounter::new(load(&m.requests[d as usize][mi][si])),
                            )
                        })
                })
            }),
        )?;

        let routes: Vec<(String, Arc<RouteStats>)> = {
            let r = m.routes.lock().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<_> = r.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let ports: Vec<(String, Arc<RouteStats>)> = {
            let p = m.ports.read().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<_> = p
                .iter()
                .map(|(k, v)| {
                    let name = if *k == 0 {
                        "other".to_owned()
                    } else {
                        k.to_string()
                    };
                    (name, v.clone())
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        {
            let mut h = enc.encode_descriptor(
                "legate_http_request_duration_seconds",
                "Time from a request to its response headers; destination is the outbound policy or the inbound application port",
                None,
                MetricType::Histogram,
            )?;
            for (dir, list) in [(Direction::Outbound, &routes), (Direction::Inbound, &ports)] {
                for (name, r) in list {
                    let labels = [("direction", dir.as_str()), ("destination", name.as_str())];
                    r.latency.encode(h.encode_family(&labels)?)?;
                }
            }
        }
        let per_route = |f: fn(&RouteStats) -> u64| {
            routes
                .iter()
                .map(move |(name, r)| ([("route", name.as_str())], ConstCounter::new(f(r))))
        };
        family(
            &mut enc,
            "legate_http_retries",
            "Retries made",
            MetricType::Counter,
            per_route(|r| load(&r.retries)),
        )?;
        family(
            &mut enc,
            "legate_http_retry_successes",
            "Requests that got a final answer after at least one retry",
            MetricType::Counter,
            per_route(|r| load(&r.retry_successes)),
        )?;
        family(
            &mut enc,
            "legate_http_retries_budget_exhausted",
            "Retries not made because the destination's retry budget was spent",
            MetricType::Counter,
            per_route(|r| load(&r.budget_exhausted)),
        )?;
        family(
            &mut enc,
            "legate_http_breaker_open",
            "Requests refused at once because the endpoint's circuit breaker was open",
            MetricType::Counter,
            per_route(|r| load(&r.breaker_open)),
        )?;
        family(
            &mut enc,
            "legate_http_limit_rejections",
            "Requests refused at once because a limit was reached",
            MetricType::Counter,
            routes.iter().flat_map(|(name, r)| {
                [
                    LimitKind::Connections,
                    LimitKind::Pending,
                    LimitKind::InFlight,
                ]
                .into_iter()
                .enumerate()
                .map(move |(i, k)| {
                    (
                        [("route", name.as_str()), ("limit", k.key())],
                        ConstCounter::new(load(&r.limit_rejections[i])),
                    )
                })
            }),
        )?;

        // Live policy state: breakers, pending and in-flight requests.
        let mut breakers = Vec::new();
        let mut transitions = Vec::new();
        let mut queues = Vec::new();
        for p in &self.policies {
            let mut states = [0i64; 3];
            p.breakers.for_each(|_, b| {
                let i = match b.state() {
                    BreakerState::Closed => 0,
                    BreakerState::Open => 1,
                    BreakerState::HalfOpen => 2,
                };
                states[i] += 1;
            });
            breakers.push((p.name().to_owned(), states));
            transitions.push((p.name().to_owned(), p.breakers.transitions_into()));
            let (mut pending, mut in_flight) = (0i64, 0i64);
            p.for_each_destination(|_, d| {
                pending += i64::from(d.limits.in_use(LimitKind::Pending));
                in_flight += i64::from(d.limits.in_use(LimitKind::InFlight));
            });
            queues.push((p.name().to_owned(), pending, in_flight));
        }
        let states = [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ];
        family(
            &mut enc,
            "legate_http_breakers",
            "Endpoints tracked by each policy's circuit breakers, by state",
            MetricType::Gauge,
            breakers.iter().flat_map(|(name, counts)| {
                states.iter().enumerate().map(move |(i, s)| {
                    (
                        [("route", name.as_str()), ("state", s.as_str())],
                        ConstGauge::new(counts[i]),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "legate_http_breaker_transitions",
            "Circuit breaker state changes, by the state entered (since the policy was loaded)",
            MetricType::Counter,
            transitions.iter().flat_map(|(name, counts)| {
                states.iter().enumerate().map(move |(i, s)| {
                    (
                        [("route", name.as_str()), ("to", s.as_str())],
                        ConstCounter::new(counts[i]),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "legate_http_pending_requests",
            "Requests waiting for a connection to their destination",
            MetricType::Gauge,
            queues
                .iter()
                .map(|(name, p, _)| ([("route", name.as_str())], ConstGauge::new(*p))),
        )?;
        family(
            &mut enc,
            "legate_http_in_flight_requests",
            "Requests sent and not yet answered in full",
            MetricType::Gauge,
            queues
                .iter()
                .map(|(name, _, f)| ([("route", name.as_str())], ConstGauge::new(*f))),
        )?;
        single(
            &mut enc,
            "legate_pool_connections",
            "Pooled mTLS connections open to peer proxies",
            MetricType::Gauge,
            ConstGauge::new(i64::try_from(self.pool.connections).unwrap_or(i64::MAX)),
        )?;
        single(
            &mut enc,
            "legate_own_connections",
            "mTLS connections open to peer proxies, each for one application connection to an in-band destination",
            MetricType::Gauge,
            ConstGauge::new(i64::try_from(self.pool.own_connections).unwrap_or(i64::MAX)),
        )?;

        let expiry = self
            .cert
            .not_after
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        single(
            &mut enc,
            "legate_identity_cert_expiry_timestamp_seconds",
            "When the workload certificate in use expires, in Unix seconds; 0 without one",
            MetricType::Gauge,
            ConstGauge::new(expiry),
        )?;
        single(
            &mut enc,
            "legate_identity_cert_renewals",
            "Workload certificates obtained from the CA, the first included",
            MetricType::Counter,
            ConstCounter::new(self.cert.renewals),
        )?;
        single(
            &mut enc,
            "legate_identity_cert_renewal_failures",
            "Attempts to obtain a workload certificate that failed",
            MetricType::Counter,
            ConstCounter::new(self.cert.renewal_failures),
        )?;
        single(
            &mut enc,
            "legate_access_log_dropped",
            "Access log lines dropped because the writer could not keep up",
            MetricType::Counter,
            ConstCounter::new(load(&m.access_dropped)),
        )?;
        single(
            &mut enc,
            "legate_opaque_http_closed",
            "Connections taken for opaque bytes that were closed because their first line \
             turned out to be an HTTP request line, whose header fields would have reached \
             the application unchecked",
            MetricType::Counter,
            ConstCounter::new(load(&m.opaque_http_closed)),
        )?;
        family(
            &mut enc,
            "legate_config_reloads",
            "Configuration reloads, by result",
            MetricType::Counter,
            [
                ([("result", "ok")], ConstCounter::new(load(&m.reloads_ok))),
                (
                    [("result", "error")],
                    ConstCounter::new(load(&m.reloads_failed)),
                ),
            ],
        )?;
        single(
            &mut enc,
            "legate_draining",
            "1 while the proxy drains before it exits",
            MetricType::Gauge,
            ConstGauge::new(m.draining.load(Ordering::Relaxed)),
        )?;
        Ok(())
    }
}

impl From<crate::detect::Protocol> for Detected {
    fn from(p: crate::detect::Protocol) -> Self {
        match p {
            crate::detect::Protocol::Http1 => Detected::Http1,
            crate::detect::Protocol::Http2 => Detected::Http2,
            crate::detect::Protocol::Opaque => Detected::Opaque,
        }
    }
}

/// The `protocol` of a connection's access log line.
pub fn protocol_label(p: crate::detect::Protocol) -> &'static str {
    match p {
        crate::detect::Protocol::Http1 => "http1",
        crate::detect::Protocol::Http2 => "h2",
        crate::detect::Protocol::Opaque => "tcp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counts_render_in_the_prometheus_text_format() {
        let m = Arc::new(Metrics::new());
        let route = m.route("default");
        for ms in [2, 30, 400] {
            m.request(
                Direction::Outbound,
                MethodClass::of(&http::Method::GET),
                http::StatusCode::OK,
                Duration::from_millis(ms),
                &route,
            );
        }
        route.retried();
        let peer = m.peer(Direction::Inbound, "spiffe://legate.local/web");
        peer.open();
        peer.add_read(1024);
        m.detected(Direction::Outbound, Detected::Http1);
        m.tls_handshake(Direction::Inbound, Err(TlsFailure::HandshakeTimeout));
        let pool = PoolStatus {
            connections: 2,
            own_connections: 3,
            handshakes: (5, [1, 0, 0]),
        };
        let text = m.render(Vec::new(), pool, CertStatus::default());
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        assert_eq!(
            get(
                r#"legate_http_requests_total{direction="outbound",method="GET",status_class="2xx"}"#
            ),
            3.0
        );
        assert_eq!(
            get(
                r#"legate_http_request_duration_seconds_bucket{direction="outbound",destination="default",le="0.005"}"#
            ),
            1.0
        );
        assert_eq!(
            get(
                r#"legate_http_request_duration_seconds_bucket{direction="outbound",destination="default",le="+Inf"}"#
            ),
            3.0
        );
        assert_eq!(
            get(
                r#"legate_http_request_duration_seconds_sum{direction="outbound",destination="default"}"#
            ),
            0.432
        );
        assert_eq!(get(r#"legate_http_retries_total{route="default"}"#), 1.0);
        assert_eq!(
            get(
                r#"legate_tcp_read_bytes_total{direction="inbound",peer="spiffe://legate.local/web"}"#
            ),
            1024.0
        );
        assert_eq!(
            get(
                r#"legate_tcp_connections_active{direction="inbound",peer="spiffe://legate.local/web"}"#
            ),
            1.0
        );
        assert_eq!(
            get(
                r#"legate_tls_handshake_failures_total{direction="inbound",reason="handshake_timeout"}"#
            ),
            1.0
        );
        assert_eq!(get("legate_pool_connections"), 2.0);
        assert_eq!(get("legate_own_connections"), 3.0);
        assert_eq!(
            get(r#"legate_tls_handshakes_total{direction="outbound"}"#),
            5.0
        );
        assert_eq!(
            get(
                r#"legate_tls_handshake_failures_total{direction="outbound",reason="handshake_failed"}"#
            ),
            1.0
        );
        assert!(text.contains("# TYPE legate_http_request_duration_seconds histogram"));
    }

    #[test]
    fn peer_and_port_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_PEERS + 50 {
            m.peer(Direction::Outbound, &format!("spiffe://td/w{i}"))
                .open();
        }
        m.peer(Direction::Outbound, "none").open();
        let series = m.peers[0].snapshot();
        assert!(series.len() <= MAX_PEERS + 3, "{}", series.len());
        let other = series.iter().find(|(id, _)| id == "other").expect("other");
        assert_eq!(load(&other.1.opened), 50);
        assert!(series.iter().any(|(id, _)| id == "none"));
        for p in 1..=(MAX_PORTS as u16 + 10) {
            m.port(p);
        }
        let ports = m.ports.read().unwrap();
        assert_eq!(ports.len(), MAX_PORTS + 1, "the first ports and `other`");
        assert!(ports.contains_key(&0));
    }
}
