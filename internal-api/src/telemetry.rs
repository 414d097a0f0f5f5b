//! JSON log lines, one object per line, with the request span's fields
//! (request id, trace id) on every event logged while serving a request.

use tracing_subscriber::EnvFilter;

use crate::configuration::DEFAULT_LOG_FILTER;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    /// For commands whose stdout is their result, such as `export-snapshot`.
    Stderr,
}

pub fn init(filter: &str, target: LogTarget) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true);
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match target {
        LogTarget::Stdout => builder.with_writer(std::io::stdout).try_init(),
        LogTarget::Stderr => builder.with_writer(std::io::stderr).try_init(),
    };
}
