//! How every natserve binary writes its log: `--log-level` picks what (a tracing filter),
//! `--log-format` how (text for a terminal, or one JSON object per line for a collector).
//! The Python processes read the same `NATSERVE_LOG_FORMAT`, so one setting switches all.
//!
//! A JSON line is `{"timestamp", "level", "target", "message", <event fields>, "span":
//! {<fields of the innermost span>}}`: an ingress line about a request has its
//! `request_id` (and `trace_id`) under `span`, an agent line has them as event fields.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The environment variable naming the log format, read by every natserve process.
pub const LOG_FORMAT_ENV: &str = "NATSERVE_LOG_FORMAT";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Installs the process's subscriber, writing to stderr.
pub fn init(filter: EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
