//! Log setup shared by every subcommand: a tracing filter and a text or
//! JSON formatter on stderr, so stdout stays free for command output (and,
//! in the proxy, for access logs).
//!
//! The filter sits behind a reload handle, so a running proxy can change
//! its log level (the admin server's `PUT /log-level`, or `log.level` in a
//! reloaded configuration) without a restart.

use std::sync::OnceLock;

use legate_config::LogFormat;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Registry};

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

static FILTER: OnceLock<reload::Handle<Targets, Registry>> = OnceLock::new();

/// A level, or `target=level` directives. Span and field filters are not
/// offered: they would build a regex engine into every binary, and its
/// pages into every proxy's memory, for a feature logs here do not need.
fn parse(level: &str) -> Result<Targets, LogError> {
    legate_config::check_log_filter(level).map_err(|reason| LogError::Filter {
        level: level.to_owned(),
        reason,
    })?;
    level.parse::<Targets>().map_err(|e| LogError::Filter {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_take_levels_and_target_directives_and_refuse_the_rest() {
        for ok in [
            "info",
            "debug",
            "info,legate_proxy=debug",
            "warn,h2=off,legate=trace",
        ] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["no=such=filter", "info,=[", "info,legate=chatty"] {
            let err = validate_filter(bad).expect_err(bad).to_string();
            assert!(err.contains("is not a valid filter"), "{err}");
        }
    }

    /// tracing takes a bare word as a target to log at every level, and
    /// nothing else: a mistyped level would silence the proxy's logs.
    #[test]
    fn a_mistyped_level_is_refused_not_taken_for_a_target() {
        let err = validate_filter("degub").expect_err("degub").to_string();
        assert!(err.contains("did you mean `debug`"), "{err}");
        let err = validate_filter("info,legate_proxy")
            .expect_err("a bare target")
            .to_string();
        assert!(err.contains("legate_proxy=debug"), "{err}");
        // An empty directive would be a target matching everything.
        assert!(validate_filter("info,").is_err());
        assert!(validate_filter("WARN,legate_proxy::http=Debug").is_ok());
    }
}
