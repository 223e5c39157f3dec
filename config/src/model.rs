//! The configuration model: every section, every key and its default.
//!
//! This file is the one place defaults live. Each section is declared with
//! the `section!` macro, which also generates its decoding, merging,
//! printing and the list of keys used for unknown-key suggestions and
//! `LEGATE_*` names.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use toml::Value;

use crate::error::{suggest, ConfigError, Origin};
use crate::field::Field;
use crate::types::*;

pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Declares a configuration section: a struct whose keys are known, with
/// defaults, that merges key by key and rejects unknown keys.
macro_rules! section {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, )*
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name { $( $(#[doc = $doc])* pub $field: $ty, )* }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $name {
            /// The keys this section accepts.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
        }

        impl Field for $name {
            fn expected() -> String {
                format!("a table with keys {}", Self::KEYS.join(", "))
            }
            fn decode_at(
                v: &Value,
                path: &str,
                origin: &Origin,
                errs: &mut Vec<ConfigError>,
            ) -> Option<Self> {
                let mut s = Self::default();
                let before = errs.len();
                s.merge_at(v, path, origin, errs);
                (errs.len() == before).then_some(s)
            }
            fn merge_at(&mut self, v: &Value, path: &str, origin: &Origin, errs: &mut Vec<ConfigError>) {
                let Some(table) = v.as_table() else {
                    errs.push(ConfigError::invalid(path, origin, v, Self::expected(), None));
                    return;
                };
                for (key, value) in table {
                    let p = join(path, key);
                    match key.as_str() {
                        $( stringify!($field) => self.$field.merge_at(value, &p, origin, errs), )*
                        _ => errs.push(ConfigError::unknown(
                            &p,
                            origin,
                            suggest(key, Self::KEYS.iter().copied()),
                        )),
                    }
                }
            }
            fn encode(&self) -> Option<Value> {
                let mut t = toml::Table::new();
                $(
                    if let Some(v) = Field::encode(&self.$field) {
                        t.insert(stringify!($field).into(), v);
                    }
                )*
                Some(Value::Table(t))
            }
            fn leaf_paths(prefix: &str, out: &mut Vec<String>) {
                $( <$ty as Field>::leaf_paths(&join(prefix, stringify!($field)), out); )*
            }
        }
    };
}

fn parsed<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    // Only used for literals in this file, which tests parse.
    s.parse().expect("a literal in this file parses")
}

section! {
    /// Everything legate reads: one model for the proxy, init and the CA.
    pub struct Config {
        /// Logging.
        log: LogConfig = LogConfig::default(),
        /// Who this workload is and where it gets its certificate.
        identity: IdentityConfig = IdentityConfig::default(),
        /// The data plane.
        proxy: ProxyConfig = ProxyConfig::default(),
        /// Traffic interception rules.
        init: InitConfig = InitConfig::default(),
        /// The certificate authority.
        ca: CaConfig = CaConfig::default(),
        /// Traces.
        telemetry: TelemetryConfig = TelemetryConfig::default(),
    }
}

section! {
    /// Log level and format.
    pub struct LogConfig {
        /// A tracing filter: `info`, `debug`, or `info,legate_proxy=trace`.
        level: String = "info".into(),
        /// `text` for people, `json` for log pipelines.
        format: LogFormat = LogFormat::Text,
        /// Access logs, one JSON line per connection and per HTTP request
        /// on stdout: `off` or `on`. Reloadable, and switchable at runtime
        /// through the admin server.
        access: AccessLogMode = AccessLogMode::Off,
        /// The fraction of connections and requests logged when access
        /// logs are on, from 0 to 1.
        access_sample: f64 = 1.0,
        /// Whether access logs and trace spans carry request paths and
        /// query strings, which may hold personal data or secrets.
        access_paths: bool = false,
    }
}

section! {
    /// Distributed tracing.
    pub struct TelemetryConfig {
        /// An OTLP/HTTP collector for traces, such as
        /// `http://otel-collector:4318` or `https://otlp.example.com`
        /// (`/v1/traces` is added when the URL has no path); traces are off
        /// when unset.
        otlp_endpoint: Option<String> = None,
        /// PEM trust anchors that verify an `https://` collector; the
        /// system's CA bundle when unset. Read at start and again for each
        /// new connection to the collector, so that a rotated CA is followed.
        otlp_ca_file: Option<PathBuf> = None,
        /// The fraction of new traces recorded, from 0 to 1; a request that
        /// arrives with a `traceparent` follows its caller's decision.
        trace_sample: f64 = 1.0,
    }
}

section! {
    /// The workload's identity and how it obtains certificates.
    pub struct IdentityConfig {
        /// The SPIFFE trust domain shared by the whole mesh.
        trust_domain: TrustDomain = parsed("legate.local"),
        /// Workload name outside Kubernetes: `spiffe://<td>/<name>`.
        name: Option<String> = None,
        /// Kubernetes namespace, used with `service_account`.
        namespace: Option<String> = None,
        /// Kubernetes ServiceAccount: `spiffe://<td>/ns/<ns>/sa/<sa>`.
        service_account: Option<String> = None,
        /// An explicit SPIFFE ID, overriding the derived one.
        id: Option<SpiffeId> = None,
        /// The CA's address, `host:port`.
        ca_address: Option<String> = None,
        /// PEM trust anchors used to verify the CA before the first certificate.
        ca_bundle: Option<PathBuf> = None,
        /// A bootstrap token from `legate ca token`.
        token: Option<Secret> = None,
        /// A file holding the bootstrap or ServiceAccount token, re-read on renewal.
        token_file: Option<PathBuf> = None,
        /// Where to write the certificate and key (mode 0600); memory only when unset.
        cert_dir: Option<PathBuf> = None,
    }
}

impl IdentityConfig {
    /// The workload's SPIFFE ID: `id`, else the Kubernetes form from
    /// `namespace` and `service_account`, else `spiffe://<td>/<name>`.
    pub fn workload_id(&self) -> Result<SpiffeId, String> {
        if let Some(id) = &self.id {
            return Ok(id.clone());
        }
        match (&self.namespace, &self.service_account, &self.name) {
            (Some(ns), Some(sa), _) => SpiffeId::new(&self.trust_domain, ["ns", ns, "sa", sa]),
            (None, None, Some(name)) => SpiffeId::new(&self.trust_domain, [name.as_str()]),
            (Some(_), None, _) | (None, Some(_), _) => {
                Err("identity.namespace and identity.service_account must be set together".into())
            }
            (None, None, None) => Err(
                "no workload identity: set identity.name (LEGATE_IDENTITY_NAME, --name), \
                 or identity.namespace and identity.service_account, or identity.id"
                    .into(),
            ),
        }
    }
}

section! {
    /// The data plane's listeners, timeouts and policy.
    pub struct ProxyConfig {
        /// The proxy's uid; init exempts its traffic from capture.
        uid: u32 = 1337,
        /// The proxy's gid; init exempts its traffic from capture.
        gid: u32 = 1337,
        /// Outbound capture port, bound on 127.0.0.1 and ::1 only.
        outbound_port: u16 = 15001,
        /// Inbound capture port, bound on all addresses.
        inbound_port: u16 = 15006,
        /// Admin server: /live, /ready, /metrics.
        admin_listen: SocketAddr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15000)),
        /// Whether inbound plaintext is accepted (`permissive`) or refused (`strict`).
        mode: InboundMode = InboundMode::Permissive,
        /// Time allowed for a TCP connect to a destination.
        connect_timeout: Duration = Duration::from_secs(3),
        /// Time allowed for an mTLS handshake.
        handshake_timeout: Duration = Duration::from_secs(5),
        /// A connection with no bytes either way for this long is closed.
        idle_timeout: Duration = Duration::from_secs(3600),
        /// Idle time before TCP keepalive probes start.
        tcp_keepalive: Duration = Duration::from_secs(60),
        /// How long a peer proxy may leave bytes sent to it unacknowledged,
        /// or a keep-alive ping unanswered, before the mesh connection to
        /// it is given up and what rides it fails (requests with 502). The
        /// default lets TCP retransmit a lost segment about five times;
        /// shorter fails over sooner from a crashed node or a cut link,
        /// longer rides out network stalls that long.
        peer_timeout: Duration = Duration::from_secs(10),
        /// How long in-flight work may take to finish after SIGTERM.
        drain_grace: Duration = Duration::from_secs(25),
        /// Threads that carry traffic, each with its own event loop and its
        /// own pooled mesh connections: a connection stays on the thread
        /// that took it, so threads never hand work to each other. `0` (the
        /// default) runs one per CPU the proxy may use, counting a cgroup's
        /// CPU limit, up to 4; `1` serves everything on one thread, the
        /// least memory for a sidecar that should take little of its pod's
        /// CPUs.
        workers: u32 = 0,
        /// Destinations here are checked for a peer proxy; others are plaintext.
        mesh_networks: Vec<IpNet> = vec![
            parsed("10.0.0.0/8"),
            parsed("172.16.0.0/12"),
            parsed("192.168.0.0/16"),
            parsed("fc00::/7"),
        ],
        /// Most mTLS connections kept to one peer proxy, per worker thread.
        pool_max_connections: u32 = 4,
        /// Streams on one pooled connection before another is opened.
        pool_max_streams: u32 = 100,
        /// A pooled connection carrying no streams for this long is closed.
        pool_idle_timeout: Duration = Duration::from_secs(90),
        /// How long the result of checking a destination for a proxy is
        /// kept; a destination found meshed stays so until this long after
        /// its proxy last answered, its connections failing meanwhile.
        probe_ttl: Duration = Duration::from_secs(30),
        /// Ports whose traffic skips protocol detection: opaque TCP from
        /// the client's proxy on, and on the server's proxy also inside
        /// tunnels from peers (which it otherwise checks for HTTP, so that
        /// the identity header stays its to set).
        opaque_ports: PortSet = PortSet::default(),
        /// Per-destination rules, first match wins.
        destinations: Vec<DestinationRule> = Vec::new(),
        /// Per-port inbound authorization.
        authz: Vec<PortPolicy> = Vec::new(),
        /// HTTP timeouts, retries, circuit breaking and limits.
        http: HttpConfig = HttpConfig::default(),
    }
}

section! {
    /// How traffic to matching destinations is carried.
    pub struct DestinationRule {
        /// Destination networks; empty matches any.
        cidrs: Vec<IpNet> = Vec::new(),
        /// Destination ports; empty matches any.
        ports: PortSet = PortSet::default(),
        /// `auto`, `strict` or `plaintext`.
        mode: DestinationMode = DestinationMode::Auto,
        /// The only identity accepted from the peer, instead of any in the trust domain.
        identity: Option<SpiffeId> = None,
    }
}

section! {
    /// Who may connect to some inbound ports. Once a port has a policy,
    /// everyone not allowed is refused.
    pub struct PortPolicy {
        /// The application ports this policy covers.
        ports: PortSet = PortSet::default(),
        /// Allowed clients.
        allow: Vec<AllowRule> = Vec::new(),
    }
}

/// Declares the HTTP policy keys once and derives from them the resolved
/// [`HttpSettings`], the `[proxy.http]` section ([`HttpConfig`], the default
/// policy plus its routes) and [`HttpRoute`], where every policy key is an
/// optional override. One list keeps the three from drifting apart.
macro_rules! http_policy {
    ( $( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, )* ) => {
        /// One HTTP policy with every value resolved: the default policy, or
        /// a route's overrides laid over it.
        #[derive(Debug, Clone, PartialEq)]
        pub struct HttpSettings { $( $(#[doc = $doc])* pub $field: $ty, )* }

        impl Default for HttpSettings {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl HttpSettings {
            /// The policy keys, shared by `[proxy.http]` and its routes.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
        }

        section! {
            /// HTTP policy for outbound requests: the default for every
            /// destination, and `routes` for some of them. Timeouts and
            /// retries apply to whole requests; budgets, breakers and limits
            /// are kept per destination address (breakers per endpoint).
            pub struct HttpConfig {
                $( $(#[doc = $doc])* $field: $ty = $default, )*
                /// The most header fields one HTTP/1.1 head may have: a
                /// request from the application or from a client outside
                /// the mesh (answered 431 beyond it), or an answer from
                /// the application or a server outside the mesh (answered
                /// 502), and its trailer section. 100, as in Envoy and
                /// hyper, unless an application sends more; from 1 to
                /// 1000. Not a route's key: a request's head is read
                /// before its route is known. Reloadable, for new
                /// connections and requests.
                max_header_fields: u32 = DEFAULT_MAX_HEADER_FIELDS,
                /// Policies for some destinations, matched by `hosts`, `cidrs`
                /// and `ports`; the first match wins, and keys a route leaves
                /// out come from `[proxy.http]`.
                routes: Vec<HttpRoute> = Vec::new(),
            }
        }

        section! {
            /// A policy for the requests it matches. Every match key given
            /// must match (an empty one matches anything); every policy key
            /// given overrides the one in `[proxy.http]`.
            pub struct HttpRoute {
                /// A label for logs and metrics; defaults to the route's position.
                name: Option<String> = None,
                /// Request authorities (`Host` or `:authority`, port ignored):
                /// `api.shop.svc` or `*.shop.svc`.
                hosts: Vec<HostPattern> = Vec::new(),
                /// Original destination networks.
                cidrs: Vec<IpNet> = Vec::new(),
                /// Original destination ports.
                ports: PortSet = PortSet::default(),
                $( $(#[doc = $doc])* $field: Option<$ty> = None, )*
            }
        }

        impl HttpConfig {
            /// The default policy.
            pub fn settings(&self) -> HttpSettings {
                HttpSettings { $( $field: self.$field.clone(), )* }
            }
        }

        impl HttpRoute {
            /// This route's policy: its own keys laid over `base`.
            pub fn settings_over(&self, base: &HttpSettings) -> HttpSettings {
                HttpSettings {
                    $( $field: self.$field.clone().unwrap_or_else(|| base.$field.clone()), )*
                }
            }

            /// Which policy keys this route sets itself.
            pub fn overrides(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $( if self.$field.is_some() { out.push(stringify!($field)); } )*
                out
            }
        }
    };
}

// The reasoning behind each default is in the proxy's `policy` module docs;
// the short version is beside each key.
http_policy! {
    /// Time from receiving a request to its response headers, across every
    /// attempt and backoff; `0` for none. Off by default, as in Linkerd and
    /// Istio: a transparent proxy must not cut requests the application
    /// expects to be slow. It does not cover streaming the response body.
    request_timeout: Duration = Duration::ZERO,
    /// Time one attempt may wait for response headers before it is given
    /// up (and retried under `5xx` or `gateway-error`); `0` for none.
    per_try_timeout: Duration = Duration::ZERO,
    /// When a failed attempt is retried: `connect-failure`, `refused-stream`,
    /// `reset`, `gateway-error` (502, 503, 504), `5xx`, `grpc-unavailable`,
    /// or status codes like `429`. The default retries only failures that
    /// prove the server never saw the request, which is safe for any method.
    /// Anything else may repeat a request the server already acted on.
    retry_on: Vec<RetryCondition> = vec![RetryCondition::ConnectFailure, RetryCondition::RefusedStream],
    /// Most tries per request, the first included; `1` never retries.
    attempts: u32 = 2,
    /// Backoff before the first retry; each retry doubles it, and a random
    /// delay up to that value is waited (full jitter).
    backoff_base: Duration = Duration::from_millis(25),
    /// Longest backoff before one retry.
    backoff_max: Duration = Duration::from_millis(250),
    /// Largest request body kept for replay; a request whose body is larger
    /// is streamed and never retried. A body of unknown length is copied
    /// as it is sent and can be retried once it has ended within this.
    retry_buffer: ByteSize = ByteSize::kib(64),
    /// Retries allowed per request over `budget_window`, on top of
    /// `budget_min_per_second`: `0.2` lets retries add at most 20% load.
    budget_ratio: f64 = 0.2,
    /// Retries per second always allowed, so low-traffic destinations can retry.
    budget_min_per_second: u32 = 10,
    /// How far back requests and retries count towards the budget.
    budget_window: Duration = Duration::from_secs(10),
    /// Consecutive failures (connect errors, resets, any 5xx, gRPC
    /// `unavailable`, and timeouts other than those that pass while the
    /// client is still uploading) that open an endpoint's circuit breaker;
    /// `0` disables it.
    breaker_failures: u32 = 5,
    /// How long an endpoint is refused after its breaker first opens; each
    /// reopening doubles it.
    breaker_base_ejection: Duration = Duration::from_secs(5),
    /// The longest an endpoint is refused in one ejection.
    breaker_max_ejection: Duration = Duration::from_secs(60),
    /// Opaque TCP connections open to one destination at once (through the
    /// mesh or not); one more is reset at once. HTTP requests share pooled
    /// connections, so they are bounded by the two limits below instead.
    /// `0` for no limit.
    max_connections: u32 = 1024,
    /// Requests to one destination waiting for a connection; `0` for no limit.
    max_pending: u32 = 1024,
    /// Requests to one destination in flight at once; `0` for no limit.
    max_in_flight: u32 = 1024,
}

/// The default of `proxy.http.max_header_fields`: hyper's and Envoy's
/// limit, and what the proxy's HTTP/1.1 parsing keeps on the stack.
pub const DEFAULT_MAX_HEADER_FIELDS: u32 = 100;
/// The most `proxy.http.max_header_fields` may allow. Besides its name and
/// value, each field takes 32 bytes of the 64 KiB header list the mesh's
/// HTTP/2 carries (RFC 9113 §6.5.2), so a head of a thousand short fields
/// already fills half of it and one of two thousand could never cross.
pub const MAX_HEADER_FIELDS_LIMIT: u32 = 1000;

/// A rule an [`HttpSettings`] breaks: `keys` are the keys involved, the
/// one to blame first.
pub(crate) struct Broken {
    pub keys: &'static [&'static str],
    pub message: String,
}

impl HttpSettings {
    /// Every rule these values break. `note(key)` is appended to a value
    /// quoted in a message, to say where it came from.
    pub(crate) fn broken(&self, note: impl Fn(&str) -> &'static str) -> Vec<Broken> {
        let mut out = Vec::new();
        let mut fail =
            |keys: &'static [&'static str], message: String| out.push(Broken { keys, message });
        let d = |key: &str, v: Duration| format!("{key} ({}{})", format_duration(v), note(key));
        if self.attempts == 0 {
            fail(
                &["attempts"],
                "must be at least 1 (the first try); 1 never retries".into(),
            );
        } else if self.attempts > 10 {
            fail(
                &["attempts"],
                "at most 10; more only lengthens failures, and the retry budget is what limits load"
                    .into(),
            );
        }
        if self.backoff_base.is_zero() {
            fail(
                &["backoff_base"],
                "must be greater than zero, or retries hit a failing destination back to back"
                    .into(),
            );
        } else if self.backoff_base > self.backoff_max {
            fail(
                &["backoff_base", "backoff_max"],
                format!(
                    "{} is longer than {}",
                    d("backoff_base", self.backoff_base),
                    d("backoff_max", self.backoff_max)
                ),
            );
        }
        if !self.per_try_timeout.is_zero()
            && !self.request_timeout.is_zero()
            && self.per_try_timeout > self.request_timeout
        {
            fail(
                &["per_try_timeout", "request_timeout"],
                format!(
                    "{} is longer than {}, so it could never fire",
                    d("per_try_timeout", self.per_try_timeout),
                    d("request_timeout", self.request_timeout)
                ),
            );
        }
        if self.retry_buffer > ByteSize::mib(16) {
            fail(
                &["retry_buffer"],
                "at most 16MiB: every request in flight may hold this much memory".into(),
            );
        }
        if !(0.0..=10.0).contains(&self.budget_ratio) {
            fail(
                &["budget_ratio"],
                "must be from 0 to 10 (0.2 lets retries add 20% to the load)".into(),
            );
        }
        if self.budget_window < Duration::from_secs(1)
            || self.budget_window > Duration::from_secs(60)
        {
            fail(&["budget_window"], "must be from 1s to 60s".into());
        }
        if self.breaker_base_ejection.is_zero() {
            fail(
                &["breaker_base_ejection"],
                "must be greater than zero".into(),
            );
        } else if self.breaker_base_ejection > self.breaker_max_ejection {
            fail(
                &["breaker_base_ejection", "breaker_max_ejection"],
                format!(
                    "{} is longer than {}",
                    d("breaker_base_ejection", self.breaker_base_ejection),
                    d("breaker_max_ejection", self.breaker_max_ejection)
                ),
            );
        }
        out
    }
}

impl HttpConfig {
    /// Every rule broken by the default policy or a route, as
    /// `(path, message)`, with `prefix` the section's own path.
    pub(crate) fn problems(&self, prefix: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(1..=MAX_HEADER_FIELDS_LIMIT).contains(&self.max_header_fields) {
            out.push((
                format!("{prefix}.max_header_fields"),
                format!(
                    "{} is out of range; use 1 to {MAX_HEADER_FIELDS_LIMIT} (default \
                     {DEFAULT_MAX_HEADER_FIELDS}), as many as the application's requests and \
                     answers carry: each field takes 32 bytes of the 64 KiB header list the \
                     mesh's HTTP/2 carries, and a thousand already fill half of it",
                    self.max_header_fields
                ),
            ));
        }
        let base = self.settings();
        let base_broken = base.broken(|_| "");
        for b in &base_broken {
            out.push((format!("{prefix}.{}", b.keys[0]), b.message.clone()));
        }
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("{prefix}.routes[{i}]");
            if route.hosts.is_empty() && route.cidrs.is_empty() && route.ports.is_empty() {
                out.push((
                    at.clone(),
                    format!(
                        "matches every request, hiding the routes after it; give it hosts, \
                         cidrs or ports, or set these keys in [{prefix}] instead"
                    ),
                ));
            }
            let own = route.overrides();
            let broken = route.settings_over(&base).broken(|k| {
                if own.contains(&k) {
                    ""
                } else {
                    ", from proxy.http"
                }
            });
            // Blame the key the route set; a rule the defaults alone break
            // was reported once above.
            for b in broken {
                if let Some(key) = b.keys.iter().find(|k| own.contains(k)) {
                    out.push((format!("{at}.{key}"), b.message));
                }
            }
        }
        out
    }
}

section! {
    /// The iptables interception rules `legate init` installs.
    pub struct InitConfig {
        /// Outbound destination ports left alone.
        exclude_outbound_ports: PortSet = PortSet::default(),
        /// Outbound destination networks left alone, also inside
        /// `include_outbound_cidrs`.
        exclude_outbound_cidrs: Vec<IpNet> = Vec::new(),
        /// When set, only these destination networks are captured, less
        /// the excluded ones. A network the excludes or loopback cover
        /// wholly would capture nothing and is refused.
        include_outbound_cidrs: Vec<IpNet> = Vec::new(),
        /// Inbound ports left alone (the admin port always is), also
        /// inside `include_inbound_ports`.
        exclude_inbound_ports: PortSet = PortSet::default(),
        /// When set, only these inbound ports are captured, less the
        /// excluded ones. A range the excludes and the admin port cover
        /// wholly would capture nothing and is refused. Under `legate
        /// run` nothing is captured inbound unless ports are listed here.
        include_inbound_ports: PortSet = PortSet::default(),
        /// Whether inbound connections are captured at all; `false` installs
        /// no PREROUTING rules, for a workload that only makes connections.
        capture_inbound: bool = true,
        /// The supplementary group `legate run` gives the command it wraps;
        /// only sockets of processes in this group are captured. Must differ
        /// from `proxy.gid`. `legate init` captures the whole namespace and
        /// ignores it.
        capture_group: u32 = 1339,
        /// `auto`, `on` or `off`.
        ipv6: Ipv6Mode = Ipv6Mode::Auto,
        /// `auto`, `nft` or `legacy`.
        backend: Backend = Backend::Auto,
    }
}

impl InitConfig {
    /// Whether `legate init` redirects inbound connections to `port` to the
    /// proxy; `admin_port` never is. The proxy asks the same question to
    /// decide whether a peer may be forwarded to localhost, so both must
    /// read the same settings.
    pub fn captures_inbound(&self, port: u16, admin_port: u16) -> bool {
        self.capture_inbound
            && port != admin_port
            && !self.exclude_inbound_ports.contains(port)
            && (self.include_inbound_ports.is_empty() || self.include_inbound_ports.contains(port))
    }

    /// Destination networks outbound capture never takes, whatever the
    /// include list says: the excluded ones and loopback. `legate init
    /// --validate` picks its target outside them.
    pub fn outbound_left_alone(&self) -> Vec<IpNet> {
        let mut out = self.exclude_outbound_cidrs.clone();
        out.extend(loopback());
        out
    }

    /// Include entries that can capture nothing, as `(key, message)`: what
    /// is left alone wins over what is included, so an entry wholly inside
    /// the excludes (or inside what is never captured: the admin port
    /// inbound, loopback outbound) is surely a mistake. An entry they cover
    /// in part is the usual way to carve out exceptions and is fine.
    /// `note(key, blamed)` says where `key`'s value came from, when that
    /// differs from where the value of `blamed`, the key the message is
    /// about, came from.
    pub(crate) fn problems(
        &self,
        admin_port: u16,
        note: impl Fn(&str, &str) -> String,
    ) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();

        const INC_IN: &str = "init.include_inbound_ports";
        const EXC_IN: &str = "init.exclude_inbound_ports";
        const ADMIN: &str = "proxy.admin_listen";
        let never = self
            .exclude_inbound_ports
            .union(&PortSet::single(admin_port));
        for &(lo, hi) in self.include_inbound_ports.ranges() {
            if !never.covers(lo, hi) {
                continue;
            }
            let entry = PortSet::new([(lo, hi)]);
            let mut why = Vec::new();
            let mut fix = vec![format!("remove {entry} from {INC_IN}")];
            let excluded = self.exclude_inbound_ports.overlapping(lo, hi);
            if !excluded.is_empty() {
                why.push(format!(
                    "{EXC_IN} leaves {excluded} alone{}, which wins over {INC_IN}",
                    note(EXC_IN, INC_IN)
                ));
                let rest = self.exclude_inbound_ports.difference(&entry);
                fix.push(if rest.is_empty() {
                    format!("drop {EXC_IN}")
                } else {
                    format!("set {EXC_IN} to {rest}")
                });
            }
            if (lo..=hi).contains(&admin_port) {
                why.push(format!(
                    "{admin_port} is the port of {ADMIN}{}, which is never captured so that \
                     probes and scrapes always reach the proxy",
                    note(ADMIN, INC_IN)
                ));
                fix.push(format!("move {ADMIN} to another port"));
            }
            out.push((
                INC_IN,
                format!(
                    "{entry} would never be captured: {}; {}",
                    why.join(", and "),
                    or_list(&fix)
                ),
            ));
        }

        const INC_OUT: &str = "init.include_outbound_cidrs";
        const EXC_OUT: &str = "init.exclude_outbound_cidrs";
        let loopback = loopback();
        let never = self.outbound_left_alone();
        for net in &self.include_outbound_cidrs {
            if !net_covered(net, &never) {
                continue;
            }
            let mut why = Vec::new();
            let mut fix = vec![format!("remove {net} from {INC_OUT}")];
            let excluded: Vec<String> = self
                .exclude_outbound_cidrs
                .iter()
                .filter(|e| nets_overlap(e, net))
                .map(ToString::to_string)
                .collect();
            if !excluded.is_empty() {
                why.push(format!(
                    "{EXC_OUT} leaves {} alone{}, which wins over {INC_OUT}",
                    excluded.join(","),
                    note(EXC_OUT, INC_OUT)
                ));
                fix.push(format!("narrow {EXC_OUT} so that it leaves {net} out"));
            }
            if loopback.iter().any(|l| nets_overlap(l, net)) {
                why.push(
                    "loopback (127.0.0.0/8, ::1) is never captured, since connections to it \
                     never leave the pod or host"
                        .into(),
                );
            }
            out.push((
                INC_OUT,
                format!(
                    "{net} would never be captured: {}; {}",
                    why.join(", and "),
                    or_list(&fix)
                ),
            ));
        }
        out
    }
}

impl InitConfig {
    /// Settings that work as written but probably not as meant, as
    /// `(key, message)`; `note(key)` says where `key`'s value came from.
    pub(crate) fn advice(&self, note: impl Fn(&str) -> String) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        // The switch wins over the list. Not an error: turning inbound
        // capture off for a while, in one layer, over a file that keeps the
        // ports for when it is back on, is a fair thing to do.
        if !self.capture_inbound && !self.include_inbound_ports.is_empty() {
            out.push((
                "init.include_inbound_ports",
                format!(
                    "{} is not captured, because init.capture_inbound is false{} and leaves \
                     every inbound connection alone; set init.capture_inbound = true to \
                     capture these ports, or remove init.include_inbound_ports",
                    self.include_inbound_ports,
                    note("init.capture_inbound")
                ),
            ));
        }
        out
    }
}

/// Loopback destinations. Every rule set starts by letting through what
/// leaves through `lo`, and a connection to these always does.
fn loopback() -> [IpNet; 2] {
    [parsed("127.0.0.0/8"), parsed("::1/128")]
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

section! {
    /// The certificate authority.
    pub struct CaConfig {
        /// Where the CA keeps its keys and certificates.
        dir: PathBuf = PathBuf::from("/var/lib/legate/ca"),
        /// The CA API's address.
        listen: SocketAddr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15012)),
        /// Lifetime of workload certificates.
        cert_ttl: Duration = Duration::from_secs(24 * 3600),
        /// How far notBefore is set in the past, for clock skew between hosts.
        backdate: Duration = Duration::from_secs(60),
        /// Lifetime of a new root.
        root_ttl: Duration = Duration::from_secs(10 * 365 * 86400),
        /// Lifetime of a new intermediate.
        intermediate_ttl: Duration = Duration::from_secs(365 * 86400),
        /// Default lifetime of tokens from `legate ca token`; 1s or more, as
        /// tokens count whole seconds.
        token_ttl: Duration = Duration::from_secs(600),
        /// Largest request body the API reads.
        max_body: ByteSize = ByteSize::kib(64),
        /// Time allowed for one API request, including reading the body.
        request_timeout: Duration = Duration::from_secs(10),
        /// Extra DNS names in the CA API's certificate, such as a Kubernetes Service name.
        dns_names: Vec<String> = Vec::new(),
        /// The Kubernetes API server that checks ServiceAccount tokens
        /// (TokenReview), as an `https://` URL. When unset, the API server
        /// of the cluster the CA runs in (`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`),
        /// and outside a cluster the method is off.
        kubernetes_api: Option<String> = None,
        /// PEM roots that verify the Kubernetes API server's certificate.
        kubernetes_ca_file: PathBuf = PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
        /// The CA's own token for the Kubernetes API, re-read for every review (it rotates).
        kubernetes_token_file: PathBuf = PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        /// The audience a workload's ServiceAccount token must be minted for.
        token_audience: String = "legate".into(),
    }
}
