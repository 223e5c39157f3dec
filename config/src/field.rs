//! How one configuration value is read from any source and written back.
//!
//! Every source (the file, `LEGATE_*` variables, flags) is reduced to a
//! [`toml::Value`] before it reaches a field, so a field type decodes in one
//! place. Values that arrive as text from the environment or the command line
//! are `Value::String`; scalar types therefore accept their textual form too.
//! Decoding never stops at the first problem: each field reports into a shared
//! error list so that an operator sees every mistake in one run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::Value;

use crate::error::{ConfigError, Origin};

/// A type that can be read from a configuration value.
pub trait Field: Sized {
    /// Describes a valid value, for error messages ("a duration like 10s").
    fn expected() -> String;

    /// Decodes a whole value, reporting problems into `errs` with `path`.
    fn decode_at(
        v: &Value,
        path: &str,
        origin: &Origin,
        errs: &mut Vec<ConfigError>,
    ) -> Option<Self>;

    /// Layers `v` over the current value. Scalars are replaced; sections
    /// override this to merge key by key, so that an environment variable for
    /// one key does not reset its siblings.
    fn merge_at(&mut self, v: &Value, path: &str, origin: &Origin, errs: &mut Vec<ConfigError>) {
        if let Some(x) = Self::decode_at(v, path, origin, errs) {
            *self = x;
        }
    }

    /// The value as it would be written in a file; `None` leaves it out.
    fn encode(&self) -> Option<Value>;

    /// Paths of values that can be set as a whole from one string (an
    /// environment variable or `--set`). Sections list their keys instead.
    fn leaf_paths(prefix: &str, out: &mut Vec<String>) {
        out.push(prefix.to_owned());
    }
}

/// A value with a single textual or TOML form, decoded in one step.
pub trait Scalar: Sized {
    fn expected() -> String;
    /// Parses the value; the error is an optional detail for the operator.
    fn parse(v: &Value) -> Result<Self, Option<String>>;
    fn encode(&self) -> Value;
}

/// Implements [`Field`] for types that are [`Scalar`].
#[macro_export]
#[doc(hidden)]
macro_rules! scalar_field {
    ($($t:ty),* $(,)?) => {$(
        impl $crate::field::Field for $t {
            fn expected() -> String {
                <$t as $crate::field::Scalar>::expected()
            }
            fn decode_at(
                v: &::toml::Value,
                path: &str,
                origin: &$crate::error::Origin,
                errs: &mut Vec<$crate::error::ConfigError>,
            ) -> Option<Self> {
                match <$t as $crate::field::Scalar>::parse(v) {
                    Ok(x) => Some(x),
                    Err(detail) => {
                        errs.push($crate::error::ConfigError::invalid(
                            path,
                            origin,
                            v,
                            <$t as $crate::field::Scalar>::expected(),
                            detail,
                        ));
                        None
                    }
                }
            }
            fn encode(&self) -> Option<::toml::Value> {
                Some($crate::field::Scalar::encode(self))
            }
        }
    )*};
}

/// Text of a value given as a string, or `None` for other TOML types.
pub(crate) fn as_text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s.trim()),
        _ => None,
    }
}

impl Scalar for String {
    fn expected() -> String {
        "a string".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::String(self.clone())
    }
}

impl Scalar for PathBuf {
    fn expected() -> String {
        "a file system path".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match as_text(v) {
            Some("") => Err(Some("the path is empty".into())),
            Some(s) => Ok(PathBuf::from(s)),
            None => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::String(self.display().to_string())
    }
}

impl Scalar for bool {
    fn expected() -> String {
        "true or false".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match v {
            Value::Boolean(b) => Ok(*b),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" => Ok(false),
                _ => Err(None),
            },
            _ => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::Boolean(*self)
    }
}

fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Scalar for u16 {
    fn expected() -> String {
        "a port number from 1 to 65535".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match integer(v) {
            Some(i) if (1..=65535).contains(&i) => Ok(i as u16),
            Some(_) => Err(Some("out of range".into())),
            None => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::Integer(i64::from(*self))
    }
}

impl Scalar for u32 {
    fn expected() -> String {
        "a whole number from 0 to 4294967295".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        integer(v).and_then(|i| u32::try_from(i).ok()).ok_or(None)
    }
    fn encode(&self) -> Value {
        Value::Integer(i64::from(*self))
    }
}

impl Scalar for f64 {
    fn expected() -> String {
        "a number".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        let f = match v {
            Value::Float(f) => *f,
            Value::Integer(i) => *i as f64,
            Value::String(s) => s.trim().parse().map_err(|_| None)?,
            _ => return Err(None),
        };
        if f.is_finite() {
            Ok(f)
        } else {
            Err(Some("the number must be finite".into()))
        }
    }
    fn encode(&self) -> Value {
        Value::Float(*self)
    }
}

impl Scalar for SocketAddr {
    fn expected() -> String {
        "a socket address like 0.0.0.0:15000 or [::1]:15000".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        as_text(v).ok_or(None)?.parse().map_err(|_| None)
    }
    fn encode(&self) -> Value {
        Value::String(self.to_string())
    }
}

impl Scalar for ipnet::IpNet {
    fn expected() -> String {
        "a CIDR like 10.0.0.0/8 or fd00::/8, or a single address".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        let s = as_text(v).ok_or(None)?;
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            // A CIDR with host bits set ("10.1.2.3/8") is almost always a typo
            // for the network or the host; refuse to guess which.
            if net.trunc() != net {
                return Err(Some(format!(
                    "host bits are set; did you mean {}?",
                    net.trunc()
                )));
            }
            return Ok(net);
        }
        s.parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| None)
    }
    fn encode(&self) -> Value {
        Value::String(self.to_string())
    }
}

impl Scalar for Duration {
    fn expected() -> String {
        "a duration like 500ms, 10s, 5m, 24h or 1h30m".into()
    }
    fn parse(v: &Value) -> Result<Self, Option<String>> {
        match v {
            Value::String(s) => crate::types::parse_duration(s).map_err(Some),
            Value::Integer(_) => Err(Some("add a unit, for example 10s".into())),
            _ => Err(None),
        }
    }
    fn encode(&self) -> Value {
        Value::String(crate::types::format_duration(*self))
    }
}

scalar_field!(
    String,
    PathBuf,
    bool,
    u16,
    u32,
    f64,
    SocketAddr,
    ipnet::IpNet,
    Duration
);

impl<T: Field> Field for Option<T> {
    fn expected() -> String {
        T::expected()
    }
    fn decode_at(
        v: &Value,
        path: &str,
        origin: &Origin,
        errs: &mut Vec<ConfigError>,
    ) -> Option<Self> {
        // An empty string from the environment or a flag unsets an optional value.
        if matches!(v, Value::String(s) if s.trim().is_empty()) {
            return Some(None);
        }
        T::decode_at(v, path, origin, errs).map(Some)
    }
    fn encode(&self) -> Option<Value> {
        self.as_ref().and_then(Field::encode)
    }
}

impl<T: Field> Field for Vec<T> {
    fn expected() -> String {
        format!("a list of {}", T::expected())
    }
    fn decode_at(
        v: &Value,
        path: &str,
        origin: &Origin,
        errs: &mut Vec<ConfigError>,
    ) -> Option<Self> {
        let items: Vec<Value> = match v {
            Value::Array(a) => a.clone(),
            // Text from the environment or a flag: a TOML array when it looks
            // like one (needed for lists of tables), otherwise comma-separated.
            Value::String(s) => {
                let s = s.trim();
                if s.starts_with('[') {
                    match format!("v = {s}").parse::<toml::Table>() {
                        Ok(mut t) => match t.remove("v") {
                            Some(Value::Array(a)) => a,
                            _ => Vec::new(),
                        },
                        Err(e) => {
                            errs.push(ConfigError::invalid(
                                path,
                                origin,
                                v,
                                Self::expected(),
                                Some(format!("not a TOML array: {}", e.message())),
                            ));
                            return None;
                        }
                    }
                } else {
                    s.split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(|p| Value::String(p.to_owned()))
                        .collect()
                }
            }
            _ => {
                errs.push(ConfigError::invalid(
                    path,
                    origin,
                    v,
                    Self::expected(),
                    None,
                ));
                return None;
            }
        };
        let before = errs.len();
        let out: Vec<T> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| T::decode_at(item, &format!("{path}[{i}]"), origin, errs))
            .collect();
        (errs.len() == before).then_some(out)
    }
    fn encode(&self) -> Option<Value> {
        Some(Value::Array(
            self.iter().filter_map(Field::encode).collect(),
        ))
    }
}
