//! natserve's wire contract, shared by the ingress and the worker agent.
//!
//! Everything two natserve processes must agree on lives here and nowhere else:
//! NATS subject and stream names, message headers, the registration and result records
//! and the KV buckets that hold them, how to connect to NATS, the outcome a reply carries,
//! how a body larger than a NATS message travels (claim checks), on how many servers of a
//! JetStream cluster each stream is kept, and the frame codec spoken
//! over each Python worker's Unix socket. The README's "Wire
//! protocol" section documents the same.

#![forbid(unsafe_code)]

pub mod agent_config;
pub mod buckets;
pub mod connection;
pub mod envelope;
pub mod frame;
pub mod headers;
pub mod logs;
pub mod names;
pub mod nats;
pub mod outcome;
pub mod payloads;
pub mod records;
pub mod replicas;
pub mod results;
pub mod streams;

pub use agent_config::{AgentConfig, ConfigError, RouteSpec, StageSpec};
pub use connection::{Connection, ConnectionError};
pub use frame::{Frame, FrameError, ItemIds, ItemResult, ItemStatus};
pub use names::{route_slug, NameError, Names, CONSUMER};
pub use outcome::Outcome;
pub use records::{
    AgentRecord, BodyType, JobState, ResultRecord, RouteRecord, RouteTypes, StageAt, StageLoad,
};
pub use results::Results;
pub use streams::{QueueConfig, Rejection};

/// The tracing filter for a `--log-level`: a bare level keeps async-nats at `warn`, whose
/// debug lines (protocol pings, every subscription) would otherwise drown natserve's own;
/// anything with a `=` or `,` is taken as the user's own directives.
pub fn log_directives(level: &str) -> String {
    match level.trim() {
        plain @ ("debug" | "trace" | "info") => format!("{plain},async_nats=warn"),
        other => other.to_owned(),
    }
}

/// Unix milliseconds now, the unit of every deadline on the wire.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bare_levels_quiet_async_nats() {
        assert_eq!(super::log_directives("debug"), "debug,async_nats=warn");
        assert_eq!(super::log_directives("warn"), "warn");
        assert_eq!(
            super::log_directives("natserve_agent=trace,info"),
            "natserve_agent=trace,info"
        );
    }
}
