//! Typed configuration for every legate component.
//!
//! One model ([`Config`]) covers the proxy, `legate init` and the CA, with
//! every default declared once in [`model`]. Values come from four layers,
//! each overriding the one before:
//!
//! 1. built-in defaults;
//! 2. a TOML file (`--config` or `LEGATE_CONFIG`);
//! 3. `LEGATE_*` environment variables, one per key: `proxy.outbound_port`
//!    is `LEGATE_PROXY_OUTBOUND_PORT` (and `LEGATE_LOG` is `log.level`);
//! 4. command-line flags, including the generic `--set key=value`.
//!
//! Loading never stops at the first mistake: every invalid value, unknown key
//! and broken rule is collected and reported together, each naming the field
//! path, the source, the bad value and what a valid one looks like.
//! Values that can be deliberate but are probably a slip load, and
//! [`Loaded::warnings`] names them for the commands to report.

pub mod error;
pub mod field;
pub mod model;
pub mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Value;

pub use error::{ConfigError, ConfigErrors, ConfigWarning, LoadError, Origin, Problem};
pub use field::Field;
pub use model::*;
pub use types::*;

/// Prefix of every environment variable legate reads.
pub const ENV_PREFIX: &str = "LEGATE_";
/// Environment variable naming the config file.
pub const ENV_CONFIG_FILE: &str = "LEGATE_CONFIG";
/// Short alias for `log.level`.
pub const ENV_LOG: &str = "LEGATE_LOG";

/// A value given on the command line for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagValue {
    /// Dotted key path, for example `proxy.mode`.
    pub path: String,
    pub value: String,
    /// The flag as the operator typed it, for error messages.
    pub flag: String,
}

/// The layers a configuration is built from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// `(name, value)` pairs; names without [`ENV_PREFIX`] are ignored.
    pub env: Vec<(String, String)>,
    pub flags: Vec<FlagValue>,
}

impl Sources {
    /// The process environment, and the config file it names unless `file` is given.
    pub fn from_process_env(file: Option<PathBuf>) -> Self {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let file = file.or_else(|| {
            env.iter()
                .find(|(k, v)| k == ENV_CONFIG_FILE && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
        });
        Sources {
            file,
            env,
            flags: Vec::new(),
        }
    }
}

/// A loaded configuration and where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Key path to the layer that set it; keys left at their default are absent.
    pub origins: BTreeMap<String, Origin>,
}

impl Loaded {
    pub fn origin(&self, path: &str) -> Origin {
        // A key inside a list item (`proxy.http.routes[0].attempts`) was set
        // along with the whole list, so the list's origin is the answer.
        let mut p = path;
        loop {
            if let Some(o) = self.origins.get(p) {
                return o.clone();
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return Origin::Default,
            }
        }
    }

    /// What loads but is probably not what was meant. Loading refuses
    /// what can never be right; these can be, so commands report them and
    /// go on.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let note = |key: &str| format!(" (from {})", self.origin(key));
        self.config
            .init
            .advice(note)
            .into_iter()
            .map(|(path, message)| ConfigWarning {
                path: path.to_owned(),
                origin: self.origin(path),
                message,
            })
            .collect()
    }
}

/// Every key that can be set from one string, as dotted paths.
pub fn key_paths() -> Vec<String> {
    let mut out = Vec::new();
    Config::leaf_paths("", &mut out);
    out
}

/// The environment variable for a key path: `proxy.mode` is `LEGATE_PROXY_MODE`.
pub fn env_name(path: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        path.replace('.', "_").to_ascii_uppercase()
    )
}

/// Wraps `value` in tables so that it sits at `path` from the root.
fn nest(path: &str, value: Value) -> Value {
    path.rsplit('.').fold(value, |inner, key| {
        let mut t = toml::Table::new();
        t.insert(key.to_owned(), inner);
        Value::Table(t)
    })
}

/// Records the key paths present in a file table, at the granularity of
/// [`key_paths`], so that rule errors can say which layer set a value.
fn record_origins(
    table: &toml::Table,
    prefix: &str,
    keys: &[String],
    origin: &Origin,
    out: &mut BTreeMap<String, Origin>,
) {
    for (k, v) in table {
        let p = model::join(prefix, k);
        match v {
            Value::Table(t) if !keys.contains(&p) => record_origins(t, &p, keys, origin, out),
            _ => {
                out.insert(p, origin.clone());
            }
        }
    }
}

/// Reads and parses a TOML file into a table.
pub fn read_file(path: &Path) -> Result<toml::Table, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|e| LoadError::Syntax {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n    "),
    })
}

/// Builds the configuration from its layers, reporting every problem.
pub fn load(sources: &Sources) -> Result<Loaded, LoadError> {
    let keys = key_paths();
    let mut config = Config::default();
    let mut origins = BTreeMap::new();
    let mut errs = Vec::new();

    if let Some(path) = &sources.file {
        let table = read_file(path)?;
        let origin = Origin::File(path.clone());
        record_origins(&table, "", &keys, &origin, &mut origins);
        config.merge_at(&Value::Table(table), "", &origin, &mut errs);
    }

    let env_names: Vec<(String, &String)> = keys.iter().map(|k| (env_name(k), k)).collect();
    let mut env: Vec<&(String, String)> = sources
        .env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != ENV_CONFIG_FILE)
        .collect();
    // The alias goes first so that the full name wins when both are set.
    env.sort_by_key(|(k, _)| k != ENV_LOG);
    for (name, value) in env {
        let origin = Origin::Env(name.clone());
        let path = if name == ENV_LOG {
            Some("log.level")
        } else {
            env_names
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.as_str())
        };
        match path {
            Some(path) => {
                origins.insert(path.to_owned(), origin.clone());
                config.merge_at(
                    &nest(path, Value::String(value.clone())),
                    "",
                    &origin,
                    &mut errs,
                );
            }
            None => errs.push(ConfigError::unknown(
                name,
                &origin,
                error::suggest(name, env_names.iter().map(|(n, _)| n.as_str())),
            )),
        }
    }

    for flag in &sources.flags {
        let origin = Origin::Flag(flag.flag.clone());
        if !keys.contains(&flag.path) {
            errs.push(ConfigError::unknown(
                &flag.path,
                &origin,
                error::suggest(&flag.path, keys.iter().map(String::as_str)),
            ));
            continue;
        }
        origins.insert(flag.path.clone(), origin.clone());
        config.merge_at(
            &nest(&flag.path, Value::String(flag.value.clone())),
            "",
            &origin,
            &mut errs,
        );
    }

    let loaded = Loaded { config, origins };
    errs.extend(validate(&loaded));
    if errs.is_empty() {
        Ok(loaded)
    } else {
        Err(LoadError::Invalid(ConfigErrors(errs)))
    }
}

/// Rules that span fields or list items.
fn validate(l: &Loaded) -> Vec<ConfigError> {
    let c = &l.config;
    let mut errs = Vec::new();
    let mut rule =
        |path: &str, msg: String| errs.push(ConfigError::rule(path, l.origin(path), msg));

    let p = &c.proxy;
    let admin = p.admin_listen.port();
    if p.outbound_port == p.inbound_port {
        rule(
            "proxy.inbound_port",
            format!(
                "{} is also proxy.outbound_port; the two capture ports must differ",
                p.inbound_port
            ),
        );
    }
    for (path, port) in [
        ("proxy.outbound_port", p.outbound_port),
        ("proxy.inbound_port", p.inbound_port),
    ] {
        if port == admin {
            rule(
                path,
                format!("{port} is also the port of proxy.admin_listen; pick another"),
            );
        }
    }
    for (path, addr, default) in [
        ("proxy.admin_listen", p.admin_listen, 15000),
        ("ca.listen", c.ca.listen, 15012),
    ] {
        if addr.port() == 0 {
            rule(
                path,
                format!(
                    "port 0 would listen on a port the system picks, which no probe, client or \
                     scraper can know; give a fixed one (default {default})"
                ),
            );
        }
    }
    // u32::MAX is (uid_t)-1 and (gid_t)-1: to setuid/setgid/chown it means
    // "leave unchanged", so the proxy would keep running as whoever started
    // it, and iptables refuses it in --uid-owner/--gid-owner. Either way the
    // capture rules could not be installed or would not exempt the proxy.
    for (path, v, default) in [
        ("proxy.uid", p.uid, 1337),
        ("proxy.gid", p.gid, 1337),
        ("init.capture_group", c.init.capture_group, 1339),
    ] {
        if v == u32::MAX {
            rule(
                path,
                format!(
                    "{v} is (uid_t)-1, which the kernel reads as \"no change\" and iptables \
                     refuses as an owner; pick one below 4294967295 (default {default})"
                ),
            );
        }
    }
    if p.uid == 0 {
        rule(
            "proxy.uid",
            "0 would exempt every root process from capture; run the proxy as its own uid (default 1337)".into(),
        );
    }
    for (name, d) in [
        ("connect_timeout", p.connect_timeout),
        ("handshake_timeout", p.handshake_timeout),
        ("idle_timeout", p.idle_timeout),
        ("tcp_keepalive", p.tcp_keepalive),
    ] {
        if d.is_zero() {
            rule(&format!("proxy.{name}"), "must be greater than zero".into());
        }
    }
    if p.peer_timeout < Duration::from_secs(1) {
        rule(
            "proxy.peer_timeout",
            format!(
                "{:?} is too short: a segment lost once and retransmitted would break the connection; use 1s or more (default 10s)",
                p.peer_timeout
            ),
        );
    }
    if p.workers > 256 {
        rule(
            "proxy.workers",
            format!(
                "{} threads is out of range; use 1 to 256 (about one per core the proxy may use), or 0 for one per CPU",
                p.workers
            ),
        );
    }
    for (name, v) in [
        ("pool_max_connections", p.pool_max_connections),
        ("pool_max_streams", p.pool_max_streams),
    ] {
        if v == 0 {
            rule(&format!("proxy.{name}"), "must be at least 1".into());
        }
    }
    for (i, d) in p.destinations.iter().enumerate() {
        if d.mode == DestinationMode::Plaintext && d.identity.is_some() {
            rule(
                &format!("proxy.destinations[{i}].identity"),
                "an identity cannot be checked on a plaintext destination; remove it or set mode = \"strict\"".into(),
            );
        }
    }
    for (i, a) in p.authz.iter().enumerate() {
        if a.ports.is_empty() {
            rule(
                &format!("proxy.authz[{i}].ports"),
                "list the application ports this policy covers".into(),
            );
        }
        for (j, b) in p.authz.iter().enumerate().skip(i + 1) {
            if let Some(port) = a
                .ports
                .ranges()
                .iter()
                .find_map(|&(lo, hi)| (lo..=hi).find(|&x| b.ports.contains(x)))
            {
                rule(
                    &format!("proxy.authz[{j}].ports"),
                    format!("port {port} is already covered by proxy.authz[{i}]; merge the two policies"),
                );
            }
        }
    }

    for (path, msg) in p.http.problems("proxy.http") {
        rule(&path, msg);
    }

    // The other key a list entry clashes with may come from another
    // layer; say which, since that is the one to change.
    let note = |key: &str, blamed: &str| {
        let origin = l.origin(key);
        if origin == l.origin(blamed) {
            String::new()
        } else {
            format!(" (from {origin})")
        }
    };
    for (path, msg) in c.init.problems(admin, note) {
        rule(path, msg);
    }

    if let Err(e) = check_log_filter(&c.log.level) {
        rule("log.level", e);
    }

    for (path, v) in [
        ("log.access_sample", c.log.access_sample),
        ("telemetry.trace_sample", c.telemetry.trace_sample),
    ] {
        if !(0.0..=1.0).contains(&v) {
            rule(path, "must be from 0 to 1 (0.1 keeps one in ten)".into());
        }
    }
    let t = &c.telemetry;
    let https = match &t.otlp_endpoint {
        Some(e) if e.starts_with("https://") => true,
        Some(e) if e.starts_with("http://") => false,
        Some(e) => {
            rule(
                "telemetry.otlp_endpoint",
                format!("{e:?} must be an http:// or https:// URL of an OTLP/HTTP receiver, such as http://otel-collector:4318"),
            );
            true
        }
        None => false,
    };
    if t.otlp_ca_file.is_some() && !https {
        rule(
            "telemetry.otlp_ca_file",
            "verifies an https:// collector, but telemetry.otlp_endpoint is not one; set an https:// endpoint or drop the file".into(),
        );
    }

    let id = &c.identity;
    if let Some(explicit) = &id.id {
        if explicit.trust_domain() != id.trust_domain.as_str() {
            rule(
                "identity.id",
                format!(
                    "{explicit} is outside identity.trust_domain {}",
                    id.trust_domain
                ),
            );
        }
    }
    // Each of these becomes part of the workload's SPIFFE ID; checking them
    // here names the key at fault, where building the ID later could only
    // say that some path was wrong.
    let td = &id.trust_domain;
    if let Some(name) = &id.name {
        if let Err(why) = name.split('/').try_for_each(check_path_segment) {
            rule(
                "identity.name",
                format!(
                    "{name:?} cannot be the path of the SPIFFE ID spiffe://{td}/<name>: {why}; \
                     give a name like web or billing-api (several such names may be joined \
                     by single '/')"
                ),
            );
        }
    }
    for (path, value, example) in [
        ("identity.namespace", &id.namespace, "default"),
        ("identity.service_account", &id.service_account, "web"),
    ] {
        if let Some(v) = value {
            if let Err(why) = check_path_segment(v) {
                rule(
                    path,
                    format!(
                        "{v:?} cannot be one segment of the SPIFFE ID \
                         spiffe://{td}/ns/<namespace>/sa/<service_account>: {why}; \
                         give a Kubernetes name like {example}"
                    ),
                );
            }
        }
    }
    if let Some(addr) = &id.ca_address {
        if let Err(why) = check_host_port(addr) {
            rule(
                "identity.ca_address",
                format!(
                    "{addr:?} is not HOST:PORT ({why}); give the CA API's address like \
                     legate-ca.legate-system.svc:15012, 10.0.0.5:15012 or [fd00::5]:15012"
                ),
            );
        }
    }
    if id.token.is_some() && id.token_file.is_some() {
        rule(
            "identity.token_file",
            "set identity.token or identity.token_file, not both".into(),
        );
    }

    let ca = &c.ca;
    if ca.cert_ttl < std::time::Duration::from_secs(2) {
        rule(
            "ca.cert_ttl",
            "must be at least 2s so a certificate can be renewed before it expires".into(),
        );
    }
    // Tokens carry their expiry in whole seconds, so a shorter lifetime
    // cannot be honoured: it would be rounded up to one second, and a token
    // that dies before it can be handed over is of no use either.
    if ca.token_ttl < Duration::from_secs(1) {
        rule(
            "ca.token_ttl",
            format!(
                "{} is under one second, and tokens count whole seconds; give 1s or more, \
                 long enough to hand the token to the workload, such as 10m (the default)",
                format_duration(ca.token_ttl)
            ),
        );
    }
    if ca.cert_ttl >= ca.intermediate_ttl {
        rule(
            "ca.cert_ttl",
            "must be shorter than ca.intermediate_ttl".into(),
        );
    }
    if ca.intermediate_ttl > ca.root_ttl {
        rule("ca.intermediate_ttl", "must not outlive ca.root_ttl".into());
    }
    if ca.request_timeout.is_zero() {
        rule(
            "ca.request_timeout",
            "must be greater than zero, or slow clients could hold connections forever".into(),
        );
    }
    if ca.max_body.0 < 1024 {
        rule("ca.max_body", "must be at least 1KiB to hold a CSR".into());
    }
    if let Some(api) = &ca.kubernetes_api {
        if let Err(msg) = check_https_url(api) {
            rule("ca.kubernetes_api", msg);
        }
    }
    let audience = ca.token_audience.as_str();
    if audience.is_empty()
        || audience
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        rule(
            "ca.token_audience",
            "must be one non-empty word without spaces, the audience of the pods' projected ServiceAccount token (default legate)".into(),
        );
    }
    errs
}

/// `HOST:PORT` as the CA client dials it: a DNS name, an IPv4 address or
/// an IPv6 address in brackets, then a port from 1 to 65535. The client
/// resolves the host with the system resolver and connects, so a scheme,
/// a path or a missing port only fails later, at every renewal.
fn check_host_port(addr: &str) -> Result<(), String> {
    if addr.contains("://") {
        return Err("no scheme: the CA is always spoken to over mTLS".into());
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let Some((v6, port)) = rest.split_once("]:") else {
            return Err("an IPv6 address in brackets must be followed by :PORT".into());
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{v6:?} in brackets is not an IPv6 address"));
        }
        (None, port)
    } else {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err("the port is missing".into());
        };
        (Some(host), port)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
    let Some(host) = host else {
        return Ok(());
    };
    if host.contains(':') {
        return Err("an IPv6 address must be in brackets, like [fd00::5]:15012".into());
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    // A DNS name, with an optional trailing dot for a fully qualified one.
    check_dns_name(host.strip_suffix('.').unwrap_or(host), true)
}

/// `https://host[:port][/path]`: the Kubernetes API is only spoken to over
/// TLS, since every request carries a bearer token.
fn check_https_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "{url:?} must start with https:// (the CA sends its token with every review)"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty()
        || authority.contains('@')
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{url:?} is not a URL like https://kubernetes.default.svc or https://10.96.0.1:443"
        ));
    }
    Ok(())
}

impl Config {
    /// The configuration as TOML, with secrets shown as `<redacted>`.
    pub fn to_toml(&self) -> String {
        match Field::encode(self) {
            Some(Value::Table(t)) => toml::to_string_pretty(&t).unwrap_or_default(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests;
