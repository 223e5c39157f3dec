//! Configuration errors that name the field, the bad value, where it came
//! from and what a valid value looks like.

use std::fmt;
use std::path::PathBuf;

/// Where a value came from, so an operator knows which knob to turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the built-in default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// The value does not parse as the field's type.
    Invalid {
        value: String,
        expected: String,
        detail: Option<String>,
    },
    /// No field has this name.
    Unknown { suggestion: Option<String> },
    /// The value parses but breaks a rule that spans fields or values.
    Rule(String),
}

/// One problem with one field. Loading collects all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Dotted path of the field, for example `proxy.outbound_port`.
    pub path: String,
    pub origin: Origin,
    pub problem: Problem,
}

impl ConfigError {
    pub(crate) fn invalid(
        path: &str,
        origin: &Origin,
        value: &toml::Value,
        expected: String,
        detail: Option<String>,
    ) -> Self {
        let value = match value {
            toml::Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        ConfigError {
            path: path.to_owned(),
            origin: origin.clone(),
            problem: Problem::Invalid {
                value,
                expected,
                detail,
            },
        }
    }

    pub(crate) fn unknown(path: &str, origin: &Origin, suggestion: Option<String>) -> Self {
        ConfigError {
            path: path.to_owned(),
            origin: origin.clone(),
            problem: Problem::Unknown { suggestion },
        }
    }

    /// A rule across fields or values; `origin` is the most useful place to look.
    pub fn rule(path: &str, origin: Origin, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_owned(),
            origin,
            problem: Problem::Rule(message.into()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Problem::Invalid {
                value,
                expected,
                detail,
            } => {
                write!(
                    f,
                    "{}: invalid value {value} (from {}); expected {expected}",
                    self.path, self.origin
                )?;
                match detail {
                    Some(d) => write!(f, "; {d}"),
                    None => Ok(()),
                }
            }
            Problem::Unknown { suggestion } => {
                write!(f, "{}: unknown key (in {})", self.path, self.origin)?;
                match suggestion {
                    Some(s) => write!(f, "; did you mean `{s}`?"),
                    None => write!(f, "; remove it or check the spelling"),
                }
            }
            Problem::Rule(msg) => write!(f, "{}: {msg} (from {})", self.path, self.origin),
        }
    }
}

/// Something that loads and works as written, but probably not as meant:
/// reported, never refused, because the same values can be deliberate
/// (a switch turned off for a while over lists kept for when it is back on).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigWarning {
    /// Dotted path of the field, for example `init.include_inbound_ports`.
    pub path: String,
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (from {})", self.path, self.message, self.origin)
    }
}

/// Every problem found while loading, in the order the sources were read.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} configuration error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}; check the path given with --config or LEGATE_CONFIG")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(ConfigErrors),
}

impl LoadError {
    /// The field problems, if that is what went wrong.
    pub fn errors(&self) -> &[ConfigError] {
        match self {
            LoadError::Invalid(e) => &e.0,
            _ => &[],
        }
    }
}

/// The closest candidate to `key`, when it is close enough to be a typo.
pub(crate) fn suggest<'a>(
    key: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(key, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_owned())
}
