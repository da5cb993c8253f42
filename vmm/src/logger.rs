//! Logging for the binaries, on `tracing`: records go to stderr; the level comes from
//! `--log-level`, else `SPECULA_LOG` (`error|warn|info|debug|trace|off`), else `warn`.
//! `log` records from the rust-vmm crates and our own modules are bridged in.

use std::sync::OnceLock;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::reload;

type Handle = reload::Handle<LevelFilter, tracing_subscriber::Registry>;

static HANDLE: OnceLock<Handle> = OnceLock::new();

/// A log level that cannot be set.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("'{0}' is not a log level (error, warn, info, debug, trace, off)")]
    UnknownLevel(String),
    #[error("cannot change the log level")]
    Reload(#[source] reload::Error),
}

/// Parses a level name.
pub fn parse_level(level: &str) -> Result<LevelFilter, LoggerError> {
    level.parse().map_err(|_| LoggerError::UnknownLevel(level.to_string()))
}

/// Installs the subscriber (once; later calls are no-ops).
pub fn init() {
    let level = std::env::var("SPECULA_LOG").ok().and_then(|l| parse_level(&l).ok()).unwrap_or(LevelFilter::WARN);
    let (filter, handle) = reload::Layer::new(level);
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(true).without_time())
        .try_init();
    if installed.is_ok() {
        let _ = HANDLE.set(handle);
        tracing::debug!("logging at {level}");
    }
}

/// Changes the level (after [`init`]).
pub fn set_level(level: &str) -> Result<(), LoggerError> {
    let level = parse_level(level)?;
    if let Some(handle) = HANDLE.get() {
        handle.modify(|filter| *filter = level).map_err(LoggerError::Reload)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_by_name() {
        assert_eq!(parse_level("debug").unwrap(), LevelFilter::DEBUG);
        assert_eq!(parse_level("off").unwrap(), LevelFilter::OFF);
        let error = parse_level("loud").unwrap_err();
        assert!(matches!(&error, LoggerError::UnknownLevel(level) if level == "loud"));
        assert!(error.to_string().contains("not a log level"), "{error}");
    }
}
