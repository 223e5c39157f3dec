//! The configuration model: every section, every key and its default.
//!
//! This file is the one place defaults live. Each section is declared with
//! [`section!`], which also generates its decoding, merging, printing and
//! the list of keys used for unknown-key suggestions and `LEGATE_*` names.

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
    // Only used for the literal defaults below, which tests parse.
    s.parse().expect("built-in default parses")
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
    }
}

section! {
    /// Log level and format.
    pub struct LogConfig {
        /// A tracing filter: `info`, `debug`, or `info,legate_proxy=trace`.
        level: String = "info".into(),
        /// `text` for people, `json` for log pipelines.
        format: LogFormat = LogFormat::Text,
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
        /// How long in-flight work may take to finish after SIGTERM.
        drain_grace: Duration = Duration::from_secs(25),
        /// Destinations here are checked for a peer proxy; others are plaintext.
        mesh_networks: Vec<IpNet> = vec![
            parsed("10.0.0.0/8"),
            parsed("172.16.0.0/12"),
            parsed("192.168.0.0/16"),
            parsed("fc00::/7"),
        ],
        /// How long the result of checking a destination for a proxy is kept.
        probe_ttl: Duration = Duration::from_secs(30),
        /// Ports whose traffic skips protocol detection.
        opaque_ports: PortSet = PortSet::default(),
        /// Per-destination rules, first match wins.
        destinations: Vec<DestinationRule> = Vec::new(),
        /// Per-port inbound authorization.
        authz: Vec<PortPolicy> = Vec::new(),
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

section! {
    /// The iptables interception rules `legate init` installs.
    pub struct InitConfig {
        /// Outbound destination ports left alone.
        exclude_outbound_ports: PortSet = PortSet::default(),
        /// Outbound destination networks left alone.
        exclude_outbound_cidrs: Vec<IpNet> = Vec::new(),
        /// When set, only these destination networks are captured.
        include_outbound_cidrs: Vec<IpNet> = Vec::new(),
        /// Inbound ports left alone (the admin port always is).
        exclude_inbound_ports: PortSet = PortSet::default(),
        /// When set, only these inbound ports are captured.
        include_inbound_ports: PortSet = PortSet::default(),
        /// `auto`, `on` or `off`.
        ipv6: Ipv6Mode = Ipv6Mode::Auto,
        /// `auto`, `nft` or `legacy`.
        backend: Backend = Backend::Auto,
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
        /// Default lifetime of tokens from `legate ca token`.
        token_ttl: Duration = Duration::from_secs(600),
        /// Largest request body the API reads.
        max_body: ByteSize = ByteSize::kib(64),
        /// Time allowed for one API request, including reading the body.
        request_timeout: Duration = Duration::from_secs(10),
        /// Extra DNS names in the CA API's certificate, such as a Kubernetes Service name.
        dns_names: Vec<String> = Vec::new(),
    }
}
