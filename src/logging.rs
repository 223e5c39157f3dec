//! Log setup shared by every subcommand: a tracing filter and a text or
//! JSON formatter on stderr, so stdout stays free for command output.

use legate_config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log.level {level:?} is not a valid filter ({reason}); use a level such as info or debug, or directives like info,legate_proxy=debug")]
    Filter { level: String, reason: String },
}

/// Installs the global subscriber. Called once, after configuration loads.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogError> {
    let filter = EnvFilter::builder()
        .parse(level)
        .map_err(|e| LogError::Filter {
            level: level.to_owned(),
            reason: e.to_string(),
        })?;
    // Colour only for a person at a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// Checks a filter without installing it.
pub fn validate_filter(level: &str) -> Result<(), LogError> {
    EnvFilter::builder()
        .parse(level)
        .map(drop)
        .map_err(|e| LogError::Filter {
            level: level.to_owned(),
            reason: e.to_string(),
        })
}
