//! Value types with their own syntax: durations, byte sizes, port sets,
//! SPIFFE identities, secrets and the small enums of the model.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use toml::Value;

use crate::field::{as_text, Scalar};
use crate::scalar_field;

/// The longest duration any setting takes: a century. No timeout or
/// lifetime needs more, and adding much more to the clock overflows it
/// (a timeout of 10^11 days made every request panic where its deadline
/// was computed).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `500ms`, `10s`, `5m`, `24h`, `7d` and sums like `1h30m`, up to
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("the duration is empty".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("`{rest}` has no unit; add one of ms, s, m, h, d"))?;
        if digits == 0 {
            return Err(format!("expected a number before `{rest}`"));
        }
        let n: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{}` is not a number", &rest[..digits]))?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let secs = match &after[..unit_len] {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            u => return Err(format!("unknown unit `{u}`; use ms, s, m, h or d")),
        };
        total = Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|part| total.checked_add(part))
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| {
                format!("`{s}` is longer than 36500d (100 years), the most any setting takes")
            })?;
        rest = &after[unit_len..];
    }
    Ok(total)
}

/// Writes a duration in the largest unit that represents it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A size in bytes, written as `65536`, `64KiB`, `10MiB`, `1GiB` or `1MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        ByteSize(n * 1024)
    }
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let n: u64 = s[..split]
            .parse()
            .map_err(|_| format!("`{s}` does not start with a whole number"))?;
        let mult: u64 = match s[split..].trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" | "ki" => 1 << 10,
            "mib" | "mi" => 1 << 20,
            "gib" | "gi" => 1 << 30,
            "kb" | "k" => 1000,
            "mb" | "m" => 1_000_000,
            "gb" | "g" => 1_000_000_000,
            u => {
                return Err(format!(
                    "unknown unit `{u}`; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| "the size is too large".into())
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Scalar for ByteSize {
    fn expected() -> String {
        "a size like 65536, 64KiB, 10MiB or 1GiB".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match v {
            Value::Integer(i) if *i >= 0 => Ok(ByteSize(*i as u64)),
            Value::String(s) => s.parse().map_err(Some),
            _ => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::String(self.to_string())
    }
}

/// A set of TCP ports, written `80,443,8000-8100` or as a TOML array.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet {
    /// Sorted, non-overlapping inclusive ranges.
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    pub fn new(ranges: impl IntoIterator<Item = (u16, u16)>) -> Self {
        let mut r: Vec<(u16, u16)> = ranges.into_iter().collect();
        r.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(r.len());
        for (lo, hi) in r {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        PortSet { ranges: merged }
    }
    pub fn single(port: u16) -> Self {
        PortSet::new([(port, port)])
    }
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
    pub fn contains(&self, port: u16) -> bool {
        self.ranges
            .binary_search_by(|&(lo, hi)| {
                if hi < port {
                    std::cmp::Ordering::Less
                } else if lo > port {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }
    /// The inclusive ranges, sorted.
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }
    pub fn union(&self, other: &PortSet) -> PortSet {
        PortSet::new(self.ranges.iter().chain(&other.ranges).copied())
    }
    /// Whether every port from `lo` to `hi` is in the set. The ranges are
    /// kept merged, touching ones too, so a range that several entries
    /// cover together lies inside a single one of them.
    pub fn covers(&self, lo: u16, hi: u16) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= lo && hi <= b)
    }
    /// The ranges of the set that share a port with `lo` to `hi`, whole.
    pub fn overlapping(&self, lo: u16, hi: u16) -> PortSet {
        PortSet::new(
            self.ranges
                .iter()
                .copied()
                .filter(|&(a, b)| a <= hi && lo <= b),
        )
    }
    /// The ports of the set that are not in `other`.
    pub fn difference(&self, other: &PortSet) -> PortSet {
        let mut out = Vec::new();
        for &(lo, hi) in &self.ranges {
            // Both lists are sorted, so what is left of this range is cut
            // from the left by each range of `other` that overlaps it.
            let mut next = u32::from(lo);
            for &(a, b) in &other.ranges {
                if u32::from(b) < next || a > hi {
                    continue;
                }
                if u32::from(a) > next {
                    out.push((next as u16, a - 1));
                }
                next = u32::from(b) + 1;
            }
            if next <= u32::from(hi) {
                out.push((next as u16, hi));
            }
        }
        PortSet::new(out)
    }
}

/// Whether two networks share an address. Networks either nest or are
/// disjoint, and those of different families are always disjoint.
pub fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    let (a, b) = (a.trunc(), b.trunc());
    a.contains(&b) || b.contains(&a)
}

/// Whether every address of `net` is in one of `by`: several networks
/// cover it together when they tile it (`10.0.0.0/9` and `10.128.0.0/9`
/// cover `10.0.0.0/8`). Networks of the other family never cover it.
pub fn net_covered(net: &IpNet, by: &[IpNet]) -> bool {
    first_uncovered(net, by).is_none()
}

/// The lowest part of `net` that shares no address with `by`, as large as
/// it can be where it starts; `None` when `by` covers all of `net`.
pub fn first_uncovered(net: &IpNet, by: &[IpNet]) -> Option<IpNet> {
    let net = net.trunc();
    let by: Vec<IpNet> = by
        .iter()
        .map(IpNet::trunc)
        .filter(|b| nets_overlap(b, &net))
        .collect();
    uncovered(net, &by)
}

/// [`first_uncovered`], with `by` already narrowed to what overlaps `net`.
fn uncovered(net: IpNet, by: &[IpNet]) -> Option<IpNet> {
    if by.is_empty() {
        return Some(net);
    }
    if by.iter().any(|b| b.contains(&net)) {
        return None;
    }
    // Networks nest or are disjoint, so what overlaps `net` without
    // containing it lies inside it, in one of its halves. Each level keeps
    // only those, so the work is bounded by their number times the prefix
    // length. A single address has no halves, but it would have been
    // contained above.
    net.subnets(net.prefix_len() + 1).ok()?.find_map(|half| {
        let inside: Vec<IpNet> = by.iter().copied().filter(|b| half.contains(b)).collect();
        uncovered(half, &inside)
    })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("`{}` is not a port number", s.trim())),
    }
}

impl FromStr for PortSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (parse_port(a)?, parse_port(b)?),
                None => {
                    let p = parse_port(part)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("range {part} is backwards; write {hi}-{lo}"));
            }
            ranges.push((lo, hi));
        }
        Ok(PortSet::new(ranges))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl Scalar for PortSet {
    fn expected() -> String {
        "ports like \"80,443,8000-8100\" or [80, 443]".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match v {
            Value::String(s) => s.parse().map_err(Some),
            Value::Integer(i) => parse_port(&i.to_string())
                .map(PortSet::single)
                .map_err(Some),
            Value::Array(items) => {
                let mut ranges = Vec::new();
                for item in items {
                    let set = Self::parse(item)?;
                    ranges.extend_from_slice(set.ranges());
                }
                Ok(PortSet::new(ranges))
            }
            _ => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::String(self.to_string())
    }
}

/// A SPIFFE trust domain: lowercase letters, digits, `.`, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the trust domain is empty".into());
        }
        if s.len() > 255 {
            return Err("the trust domain is longer than 255 characters".into());
        }
        match s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            Some(c) => Err(format!(
                "`{c}` is not allowed; use lowercase letters, digits, '.', '-' and '_'"
            )),
            None => Ok(TrustDomain(s.to_owned())),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`, checked against the
/// SPIFFE ID specification so that two spellings of one identity never exist.
/// Shared, not owned: the proxy copies a peer's ID into every request's
/// bookkeeping, and a clone is then a reference count, not an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: std::sync::Arc<str>,
    /// Length of `spiffe://<trust-domain>`.
    td_end: usize,
}

impl SpiffeId {
    /// Builds `spiffe://<td>/<segments...>`, validating each segment.
    pub fn new<'a>(
        td: &TrustDomain,
        segments: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, String> {
        let mut uri = format!("spiffe://{td}");
        for seg in segments {
            uri.push('/');
            uri.push_str(seg);
        }
        uri.parse()
    }
    pub fn as_str(&self) -> &str {
        &self.uri
    }
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.td_end]
    }
    /// The path, starting with `/`, or empty.
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }
}

impl FromStr for SpiffeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| "a SPIFFE ID starts with spiffe://".to_string())?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        rest[..td_len].parse::<TrustDomain>()?;
        let path = &rest[td_len..];
        if path == "/" {
            return Err("the path must not end with '/'".into());
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                check_path_segment(seg)?;
            }
        }
        if s.len() > 2048 {
            return Err("a SPIFFE ID is at most 2048 bytes".into());
        }
        Ok(SpiffeId {
            uri: s.into(),
            td_end: "spiffe://".len() + td_len,
        })
    }
}

/// Checks one segment of a SPIFFE ID's path against the specification:
/// not empty, not `.` or `..`, and only letters, digits, `.`, `-` and `_`.
/// The keys that become path segments (`identity.name`,
/// `identity.namespace`, `identity.service_account`) are checked with it
/// when the configuration loads, so that a bad value is refused there, by
/// its key, rather than when a command later builds the ID.
pub fn check_path_segment(seg: &str) -> Result<(), String> {
    if seg.is_empty() {
        return Err("the path has an empty segment ('//' or a trailing '/')".into());
    }
    if seg == "." || seg == ".." {
        return Err("the path must not contain '.' or '..' segments".into());
    }
    if let Some(c) = seg
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "`{c}` is not allowed in a path; use letters, digits, '.', '-' and '_'"
        ));
    }
    Ok(())
}

/// Level names a log filter takes, in tracing's spelling.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a log filter (`log.level`, `LEGATE_LOG`, the admin server's
/// `PUT /log-level`): comma-separated directives, each a level or
/// `target=level`. tracing also takes a bare word as a target to log at
/// every level, and then nothing else: a mistyped level (`degub`) would
/// silence every log line, so a bare word must be a level here and a
/// target must name its level.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    let is_level = |w: &str| LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(w));
    let levels = LOG_LEVELS.join(", ");
    for directive in filter.split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(
                "it has an empty directive (a ',' too many); give levels and \
                 target=level pairs separated by single commas, such as info,legate_proxy=debug"
                    .into(),
            );
        }
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if !is_level(level) {
            // Edits rather than the key suggester's similarity: level
            // names are short, and typing slips in them are swapped or
            // missing letters (`degub`, `inf`).
            let lower = level.to_ascii_lowercase();
            let near = LOG_LEVELS
                .iter()
                .map(|l| (strsim::damerau_levenshtein(&lower, l), *l))
                .filter(|(d, l)| *d <= 2 && 2 * d < l.len())
                .min();
            let hint = match near {
                Some((_, s)) => format!("; did you mean `{s}`?"),
                None if target.is_none() => {
                    format!("; a target needs its level, as in {directive}=debug")
                }
                None => String::new(),
            };
            return Err(format!(
                "`{level}` is not a level (use one of {levels}){hint}"
            ));
        }
        if let Some(target) = target {
            if target.is_empty() {
                return Err(format!("`{directive}` names no target before its '='"));
            }
            if let Some(c) = target
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.')))
            {
                return Err(format!(
                    "target `{target}` holds `{c}`; targets are module paths such as \
                     legate_proxy::http (span and field filters are not supported)"
                ));
            }
        }
    }
    Ok(())
}

/// Checks a DNS name (without a trailing dot): at most 253 characters, in
/// dot-separated labels of 1 to 63 letters, digits and `-` (not at either
/// end of a label), and `_` too when `underscore` is set: resolvers take it
/// in names they look up, while a certificate's dNSName must not hold it.
pub fn check_dns_name(name: &str, underscore: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > 253 {
        return Err("the name is longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("the name has an empty label ('..', or a '.' at either end)".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || (underscore && c == '_')))
        {
            let allowed = if underscore {
                "letters, digits, '-', '_' and '.'"
            } else {
                "letters, digits, '-' and '.'"
            };
            return Err(format!("{c:?} is not allowed in a DNS name; use {allowed}"));
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Implements [`Scalar`] through `FromStr` and `Display`.
macro_rules! text_scalar {
    ($($t:ty => $expected:expr),* $(,)?) => {$(
        impl Scalar for $t {
            fn expected() -> String {
                $expected.into()
            }
            fn parse(v: &Value) -> Result<Self, Option<String>> {
                as_text(v).ok_or(None)?.parse().map_err(Some)
            }
            fn encode(&self) -> Value {
                Value::String(self.to_string())
            }
        }
    )*};
}

text_scalar!(
    TrustDomain => "a trust domain like example.org",
    SpiffeId => "a SPIFFE ID like spiffe://example.org/ns/default/sa/web",
);

/// A value that is never printed: `legate config check` and `/config` show
/// `<redacted>` instead.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Scalar for Secret {
    fn expected() -> String {
        "a string".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match v {
            Value::String(s) => Ok(Secret(s.clone())),
            _ => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::String("<redacted>".into())
    }
}

/// Defines a fieldless enum written as one of a fixed set of words.
macro_rules! word_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $variant:ident => $word:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant),* }

        impl $name {
            pub const WORDS: &'static [&'static str] = &[$($word),*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),* }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($word => Ok($name::$variant),)*
                    _ => Err(match crate::error::suggest(s, Self::WORDS.iter().copied()) {
                        Some(w) => format!("did you mean `{w}`?"),
                        None => format!("`{s}` is not one of them"),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Scalar for $name {
            fn expected() -> String {
                format!("one of {}", Self::WORDS.join(", "))
            }
            fn parse(v: &Value) -> Result<Self, Option<String>> {
                as_text(v).ok_or(None)?.parse().map_err(Some)
            }
            fn encode(&self) -> Value {
                Value::String(self.as_str().into())
            }
        }
    };
}

word_enum!(
    /// How log lines are written.
    pub enum LogFormat {
        Text => "text",
        Json => "json",
    }
);

word_enum!(
    /// Whether access logs are written.
    pub enum AccessLogMode {
        Off => "off",
        On => "on",
    }
);

word_enum!(
    /// Whether inbound plaintext from clients outside the mesh is accepted.
    pub enum InboundMode {
        /// Mesh clients get mTLS; others pass through in plaintext.
        Permissive => "permissive",
        /// Only authenticated mesh clients are accepted.
        Strict => "strict",
    }
);

word_enum!(
    /// How outbound traffic to a destination is carried.
    pub enum DestinationMode {
        /// mTLS when the destination has a proxy, plaintext otherwise.
        Auto => "auto",
        /// Always mTLS; the connection fails rather than fall back to plaintext.
        Strict => "strict",
        /// Never mTLS: the bytes pass through untouched.
        Plaintext => "plaintext",
    }
);

word_enum!(
    /// Whether `legate init` installs IPv6 rules.
    pub enum Ipv6Mode {
        /// When the namespace has IPv6 and ip6tables works.
        Auto => "auto",
        On => "on",
        Off => "off",
    }
);

word_enum!(
    /// Which iptables backend `legate init` drives.
    pub enum Backend {
        /// Chosen by a fixed rule; see the init crate.
        Auto => "auto",
        Nft => "nft",
        Legacy => "legacy",
    }
);

/// Who an inbound port admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// Any client with a verified identity in the mesh's trust domain.
    Authenticated,
    /// Clients without mesh identity (plaintext), for permissive ports.
    Unauthenticated,
    /// Exactly this identity.
    Exact(SpiffeId),
    /// Identities under this prefix: `spiffe://td/ns/shop/*` admits the
    /// whole `shop` namespace. The stored prefix ends with `/`.
    Prefix(String),
}

impl AllowRule {
    /// Whether a verified peer identity matches; `None` means plaintext.
    pub fn admits(&self, peer: Option<&SpiffeId>, trust_domain: &TrustDomain) -> bool {
        match (self, peer) {
            (AllowRule::Unauthenticated, _) => true,
            (AllowRule::Authenticated, Some(id)) => id.trust_domain() == trust_domain.as_str(),
            (AllowRule::Exact(want), Some(id)) => want == id,
            (AllowRule::Prefix(p), Some(id)) => id.as_str().starts_with(p.as_str()),
            (_, None) => false,
        }
    }
}

impl FromStr for AllowRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "authenticated" => return Ok(AllowRule::Authenticated),
            "unauthenticated" => return Ok(AllowRule::Unauthenticated),
            _ => {}
        }
        if let Some(prefix) = s.strip_suffix("/*") {
            prefix.parse::<SpiffeId>()?;
            return Ok(AllowRule::Prefix(format!("{prefix}/")));
        }
        if s.starts_with("spiffe://") {
            return s.parse().map(AllowRule::Exact);
        }
        Err(
            match crate::error::suggest(s, ["authenticated", "unauthenticated"]) {
                Some(w) => format!("did you mean `{w}`?"),
                None => {
                    "not a SPIFFE ID, a prefix ending in /*, `authenticated` or `unauthenticated`"
                        .into()
                }
            },
        )
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowRule::Authenticated => f.write_str("authenticated"),
            AllowRule::Unauthenticated => f.write_str("unauthenticated"),
            AllowRule::Exact(id) => write!(f, "{id}"),
            AllowRule::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

text_scalar!(
    AllowRule => "authenticated, unauthenticated, a SPIFFE ID, or a prefix like spiffe://td/ns/shop/*",
);

/// A condition under which an HTTP request is retried, as written in
/// `retry_on`: one of [`RetryCondition::WORDS`] or a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryCondition {
    /// `connect-failure`: no connection to the destination could be made,
    /// so nothing was sent.
    ConnectFailure,
    /// `refused-stream`: HTTP/2 `REFUSED_STREAM`, or a `GOAWAY` that leaves
    /// the stream unprocessed; the server guarantees it did nothing.
    RefusedStream,
    /// `reset`: the connection or stream broke after the request was sent
    /// and before a response arrived.
    Reset,
    /// `gateway-error`: 502, 503 or 504, and a per-try timeout.
    GatewayError,
    /// `5xx`: any 500-599 response, and a per-try timeout.
    ServerError,
    /// `grpc-unavailable`: a gRPC response with `grpc-status: 14` in its headers.
    GrpcUnavailable,
    /// A status code: `429`, `409`.
    Status(u16),
}

impl RetryCondition {
    /// The conditions written as words.
    pub const WORDS: &'static [&'static str] = &[
        "connect-failure",
        "refused-stream",
        "reset",
        "gateway-error",
        "5xx",
        "grpc-unavailable",
    ];
}

impl FromStr for RetryCondition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let word = s.trim().to_ascii_lowercase();
        let c = match word.as_str() {
            "connect-failure" => RetryCondition::ConnectFailure,
            "refused-stream" => RetryCondition::RefusedStream,
            "reset" => RetryCondition::Reset,
            "gateway-error" => RetryCondition::GatewayError,
            "5xx" => RetryCondition::ServerError,
            "grpc-unavailable" => RetryCondition::GrpcUnavailable,
            w if w.bytes().all(|b| b.is_ascii_digit()) => {
                return match w.parse::<u16>() {
                    // Only an error can be worth retrying: a 1xx-3xx is an
                    // answer, and a 2xx retried would repeat a success.
                    Ok(code @ 400..=599) => Ok(RetryCondition::Status(code)),
                    _ => Err(format!(
                        "status {w} is not an error; list codes from 400 to 599"
                    )),
                };
            }
            w => {
                return Err(
                    match crate::error::suggest(w, Self::WORDS.iter().copied()) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => format!("`{w}` is neither a condition nor a status code"),
                    },
                )
            }
        };
        Ok(c)
    }
}

impl fmt::Display for RetryCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            RetryCondition::ConnectFailure => "connect-failure",
            RetryCondition::RefusedStream => "refused-stream",
            RetryCondition::Reset => "reset",
            RetryCondition::GatewayError => "gateway-error",
            RetryCondition::ServerError => "5xx",
            RetryCondition::GrpcUnavailable => "grpc-unavailable",
            RetryCondition::Status(code) => return write!(f, "{code}"),
        };
        f.write_str(word)
    }
}

impl Scalar for RetryCondition {
    fn expected() -> String {
        format!(
            "one of {} or a status code from 400 to 599",
            Self::WORDS.join(", ")
        )
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match v {
            Value::Integer(i) => i.to_string().parse().map_err(Some),
            _ => as_text(v).ok_or(None)?.parse().map_err(Some),
        }
    }
    fn encode(&self) -> Value {
        match self {
            RetryCondition::Status(code) => Value::Integer(i64::from(*code)),
            other => Value::String(other.to_string()),
        }
    }
}

/// A request authority to match, without the port: `api.shop.svc` exactly,
/// or `*.shop.svc` for every name under `shop.svc` (but not `shop.svc`
/// itself). Matching ignores ASCII case and a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// The whole name, lowercase, without a trailing dot.
    Exact(String),
    /// The suffix a name must end with, lowercase, starting with `.`.
    Suffix(String),
}

impl HostPattern {
    /// Whether `host` (no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if name.is_empty() {
            return Err(if wild {
                "`*.` needs a domain after it, like *.example.com".into()
            } else {
                "the host is empty".into()
            });
        }
        if name.contains('*') {
            return Err("`*` is only allowed as a whole first label, like *.example.com".into());
        }
        if let Some(inner) = name.strip_prefix('[') {
            // An IPv6 literal, as it appears in an authority.
            let ok = !wild
                && inner
                    .strip_suffix(']')
                    .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
            return if ok {
                Ok(HostPattern::Exact(name))
            } else {
                Err("not an IPv6 address in brackets like [fd00::1]".into())
            };
        }
        if name.contains(':') {
            return Err("hosts are matched without the port; match the port with `ports`".into());
        }
        if name.split('.').any(str::is_empty) {
            return Err("the name has an empty label ('..' or a leading '.')".into());
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!(
                "`{c}` is not allowed in a host name; use letters, digits, '-', '_' and '.'"
            ));
        }
        Ok(if wild {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name)
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Suffix(suffix) => write!(f, "*{suffix}"),
        }
    }
}

text_scalar!(
    HostPattern => "a host like api.shop.svc or a wildcard like *.shop.svc",
);

scalar_field!(
    ByteSize,
    PortSet,
    TrustDomain,
    SpiffeId,
    Secret,
    LogFormat,
    AccessLogMode,
    InboundMode,
    DestinationMode,
    Ipv6Mode,
    Backend,
    AllowRule,
    RetryCondition,
    HostPattern,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10y").unwrap_err().contains("unknown unit"));
        // Parts that each fit a Duration but not their sum, and values
        // that fit but would overflow a clock they are added to, are
        // refused with a reason, never a panic.
        for huge in [
            "10000000000000000000s10000000000000000000s",
            "100000000000d",
            "36500d1ms",
            "1e400s",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("36500d") || e.contains("unit"), "{huge}: {e}");
        }
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        assert_eq!(format_duration(Duration::from_secs(86400)), "1d");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("64KiB".parse(), Ok(ByteSize(65536)));
        assert_eq!("1GB".parse(), Ok(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::mib(10).to_string(), "10MiB");
        assert!("12parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn port_sets_merge_and_match() {
        let p: PortSet = "8000-8100, 80,443,81,8050-8200".parse().unwrap();
        assert_eq!(p.to_string(), "80-81,443,8000-8200");
        assert!(p.contains(8150) && p.contains(80) && !p.contains(82));
        assert!("0".parse::<PortSet>().is_err());
        assert!("90-80"
            .parse::<PortSet>()
            .unwrap_err()
            .contains("backwards"));
        assert!("".parse::<PortSet>().unwrap().is_empty());
    }

    #[test]
    fn a_port_range_is_covered_by_entries_that_together_hold_it() {
        let set: PortSet = "8000-8499,8500-8999,9100".parse().unwrap();
        assert!(set.covers(8080, 8080));
        assert!(set.covers(8000, 8999), "touching entries cover together");
        assert!(set.covers(9100, 9100));
        assert!(!set.covers(7999, 8000), "one port outside");
        assert!(!set.covers(8999, 9000));
        assert!(!set.covers(9000, 9100), "a gap inside");
        assert!(!PortSet::default().covers(1, 1));
        assert_eq!(set.overlapping(8990, 9200).to_string(), "8000-8999,9100");
        assert!(set.overlapping(9001, 9099).is_empty());
    }

    #[test]
    fn port_set_difference_keeps_what_the_other_lacks() {
        let set: PortSet = "8000-8999,9100".parse().unwrap();
        let minus = |other: &str| set.difference(&other.parse().unwrap()).to_string();
        assert_eq!(minus("8080"), "8000-8079,8081-8999,9100");
        assert_eq!(minus("8000-8999"), "9100");
        assert_eq!(minus("7000-8000,8999-9100"), "8001-8998");
        assert_eq!(minus("8100,8200,9100"), "8000-8099,8101-8199,8201-8999");
        assert_eq!(minus("1-65535"), "");
        assert_eq!(minus(""), "8000-8999,9100");
        let all: PortSet = "1-65535".parse().unwrap();
        assert_eq!(
            all.difference(&"1,65535".parse().unwrap()).to_string(),
            "2-65534"
        );
    }

    #[test]
    fn a_network_is_covered_by_networks_that_together_hold_it() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let ten = [n("10.0.0.0/8")];
        assert!(net_covered(&n("10.1.0.0/16"), &ten));
        assert!(net_covered(&n("10.0.0.0/8"), &ten));
        assert!(
            !net_covered(&n("10.0.0.0/7"), &ten),
            "half of it is outside"
        );
        assert!(!net_covered(&n("11.0.0.0/8"), &ten));
        assert!(!net_covered(&n("10.0.0.0/8"), &[]));
        // Several networks that tile it cover it; with a piece missing
        // they do not.
        let pieces = [n("10.0.0.0/9"), n("10.128.0.0/10"), n("10.192.0.0/10")];
        assert!(net_covered(&n("10.0.0.0/8"), &pieces));
        assert!(!net_covered(&n("10.0.0.0/8"), &pieces[..2]));
        assert!(net_covered(
            &n("0.0.0.0/0"),
            &[n("0.0.0.0/1"), n("128.0.0.0/1")]
        ));
        let hosts: Vec<IpNet> = (0..=255u8)
            .map(|i| IpNet::from(std::net::IpAddr::from([192, 0, 2, i])))
            .collect();
        assert!(net_covered(&n("192.0.2.0/24"), &hosts));
        assert!(!net_covered(&n("192.0.2.0/24"), &hosts[1..]));
        assert!(!net_covered(
            &n("10.0.0.1/32"),
            &[n("10.0.0.0/32"), n("10.0.0.2/31")]
        ));
        // Nothing of one family covers or overlaps the other, not even
        // IPv4-mapped IPv6 addresses.
        assert!(!net_covered(&n("10.0.0.0/8"), &[n("::/0")]));
        assert!(!net_covered(&n("::ffff:10.0.0.0/104"), &[n("0.0.0.0/0")]));
        assert!(net_covered(&n("fd00::1/128"), &[n("fd00::/8")]));
        // The first part left, for a target that is captured.
        assert_eq!(
            first_uncovered(&n("10.0.0.0/8"), &[n("10.0.0.0/16")]),
            Some(n("10.1.0.0/16"))
        );
        assert_eq!(
            first_uncovered(&n("10.0.0.0/8"), &[n("10.0.0.0/9"), n("10.128.0.0/10")]),
            Some(n("10.192.0.0/10"))
        );
        assert_eq!(
            first_uncovered(&n("10.0.0.0/8"), &[n("11.0.0.0/8"), n("::/0")]),
            Some(n("10.0.0.0/8"))
        );
        assert_eq!(first_uncovered(&n("192.0.2.0/24"), &hosts), None);
        assert_eq!(
            first_uncovered(&n("192.0.2.0/24"), &hosts[..255]),
            Some(n("192.0.2.255/32"))
        );
        assert!(nets_overlap(&n("10.0.0.0/8"), &n("10.1.0.0/16")));
        assert!(nets_overlap(&n("10.1.0.0/16"), &n("10.0.0.0/8")));
        assert!(!nets_overlap(&n("10.0.0.0/8"), &n("11.0.0.0/8")));
        assert!(!nets_overlap(&n("0.0.0.0/0"), &n("::/0")));
    }

    #[test]
    fn spiffe_ids_follow_the_spec() {
        let id: SpiffeId = "spiffe://example.org/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        for bad in [
            "http://example.org/x",
            "spiffe://Example.org/x",
            "spiffe://example.org/",
            "spiffe://example.org//x",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn retry_conditions_are_words_or_error_statuses() {
        assert_eq!("gateway-error".parse(), Ok(RetryCondition::GatewayError));
        assert_eq!(" 5XX ".parse(), Ok(RetryCondition::ServerError));
        assert_eq!("429".parse(), Ok(RetryCondition::Status(429)));
        let typo = "gateway_eror".parse::<RetryCondition>().unwrap_err();
        assert!(typo.contains("did you mean `gateway-error`"), "{typo}");
        assert!("200"
            .parse::<RetryCondition>()
            .unwrap_err()
            .contains("not an error"));
        assert!("70000".parse::<RetryCondition>().is_err());
        assert!("sometimes".parse::<RetryCondition>().is_err());
        for c in RetryCondition::WORDS {
            let parsed: RetryCondition = c.parse().unwrap();
            assert_eq!(parsed.to_string(), *c);
        }
        assert_eq!(
            <RetryCondition as Scalar>::parse(&Value::Integer(503)),
            Ok(RetryCondition::Status(503))
        );
    }

    #[test]
    fn host_patterns_match_names_and_suffixes() {
        let exact: HostPattern = "API.Shop.svc.".parse().unwrap();
        assert!(exact.matches("api.shop.svc") && exact.matches("api.SHOP.svc."));
        assert!(!exact.matches("x.api.shop.svc"));
        let wild: HostPattern = "*.shop.svc".parse().unwrap();
        assert_eq!(wild.to_string(), "*.shop.svc");
        assert!(wild.matches("api.shop.svc") && wild.matches("a.b.Shop.Svc"));
        assert!(!wild.matches("shop.svc"), "the wildcard needs a label");
        assert!(!wild.matches("xshop.svc"));
        assert!(!wild.matches("é.shop.sv"), "non-ASCII never panics");
        let v6: HostPattern = "[FD00::1]".parse().unwrap();
        assert!(v6.matches("[fd00::1]"));
        for (bad, why) in [
            ("api.shop.svc:8080", "ports"),
            ("*", "only allowed"),
            ("*.", "needs a domain"),
            ("api*.shop", "only allowed"),
            ("a..b", "empty label"),
            ("a b", "not allowed"),
            ("[zz]", "IPv6"),
            ("", "empty"),
        ] {
            let err = bad.parse::<HostPattern>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn allow_rules() {
        let td: TrustDomain = "td".parse().unwrap();
        let web: SpiffeId = "spiffe://td/ns/shop/sa/web".parse().unwrap();
        let other: SpiffeId = "spiffe://other/ns/shop/sa/web".parse().unwrap();
        let ns: AllowRule = "spiffe://td/ns/shop/*".parse().unwrap();
        assert!(ns.admits(Some(&web), &td));
        assert!(!"spiffe://td/ns/sh/*"
            .parse::<AllowRule>()
            .unwrap()
            .admits(Some(&web), &td));
        assert!(AllowRule::Authenticated.admits(Some(&web), &td));
        assert!(!AllowRule::Authenticated.admits(Some(&other), &td));
        assert!(!AllowRule::Authenticated.admits(None, &td));
        assert!(AllowRule::Unauthenticated.admits(None, &td));
        assert!("authenticatd"
            .parse::<AllowRule>()
            .unwrap_err()
            .contains("authenticated"));
    }
}
