//! Log setup shared by every subcommand: a tracing filter and a text or
//! JSON formatter on stderr, so stdout stays free for command output (and,
//! in the proxy, for access logs).
//!
//! The filter sits behind a reload handle, so a running proxy can change
//! its log level (the admin server's `PUT /log-level`, or `log.level` in a
//! reloaded configuration) without a restart.

use std::sync::OnceLock;

use legate_config::LogFormat;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Why logging could not start, or a filter could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log.level {level:?} is not a valid filter ({reason}); use a level such as info or debug, or directives like info,legate_proxy=debug")]
    Filter { level: String, reason: String },
    #[error("logging has not been set up in this process, so its level cannot change")]
    NotInitialized,
    #[error("cannot change the log level: {0}")]
    Reload(String),
}

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn parse(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| LogError::Filter {
            level: level.to_owned(),
            reason: e.to_string(),
        })
}

/// Installs the global subscriber. Called once, after configuration loads.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogError> {
    let (filter, handle) = reload::Layer::new(parse(level)?);
    // Colour only for a person at a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (only possible in tests) keeps the first subscriber.
    let installed = match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
    Ok(())
}

/// Replaces the filter of the running subscriber.
pub fn set_level(level: &str) -> Result<(), LogError> {
    let filter = parse(level)?;
    FILTER
        .get()
        .ok_or(LogError::NotInitialized)?
        .reload(filter)
        .map_err(|e| LogError::Reload(e.to_string()))
}

/// Checks a filter without installing it.
pub fn validate_filter(level: &str) -> Result<(), LogError> {
    parse(level).map(drop)
}
