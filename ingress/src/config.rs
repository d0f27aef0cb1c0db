//! What one ingress needs to know to run: where NATS is, which namespace, and its limits.
//!
//! The HTTP listener is not part of it: the caller binds it and hands it to [`crate::run`],
//! so tests can listen on an ephemeral port.

use std::time::Duration;

use natserve_protocol::nats::NatsSecurity;

/// Settings of one ingress. Build it with [`Config::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server URL(s), comma-separated; may carry a user and password or a token.
    pub nats_url: String,
    /// Credentials files and TLS for NATS.
    pub nats_security: NatsSecurity,
    /// Deployment namespace every subject, stream and bucket name derives from.
    pub namespace: String,
    /// End-to-end deadline of one request, from its arrival to its reply.
    pub timeout: Duration,
    /// Largest request body accepted, in bytes (NATS `max_payload` may lower it further).
    pub max_body_size: usize,
    /// How long shutdown waits for in-flight requests before it stops the HTTP server.
    pub grace: Duration,
    /// How long the first connection to NATS is retried before [`crate::run`] gives up.
    pub connect_timeout: Duration,
    /// Most HTTP connections open at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// A connection whose request headers are not complete this long after it opened (or
    /// after its previous response, when kept alive) is closed.
    pub header_read_timeout: Duration,
    /// How long an asynchronous job's result is kept once finished (and its pending
    /// record, from its submit).
    pub result_ttl: Duration,
    /// Deadline of an asynchronous job (`Prefer: respond-async`), from its submit; at most
    /// `result_ttl`, so a job's pending record outlives it.
    pub async_timeout: Duration,
    /// Servers of a JetStream cluster that keep a copy of each bucket this ingress makes
    /// (`natserve_protocol::replicas`).
    pub replicas: usize,
}

impl Config {
    pub const DEFAULT_NATS_URL: &'static str = "nats://127.0.0.1:4222";
    pub const DEFAULT_NAMESPACE: &'static str = "natserve";
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);
    /// Mosec's default, as the launcher's `--max-body-size` (`--max-request-size`).
    pub const DEFAULT_MAX_BODY_SIZE: usize = 10 * 1024 * 1024;
    pub const DEFAULT_GRACE: Duration = Duration::from_millis(10_000);
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_RESULT_TTL: Duration = natserve_protocol::buckets::DEFAULT_RESULT_TTL;
    pub const DEFAULT_ASYNC_TIMEOUT: Duration = Duration::from_secs(600);

    /// Defaults for everything but the NATS URL.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_security: NatsSecurity::default(),
            namespace: Self::DEFAULT_NAMESPACE.to_owned(),
            timeout: Self::DEFAULT_TIMEOUT,
            max_body_size: Self::DEFAULT_MAX_BODY_SIZE,
            grace: Self::DEFAULT_GRACE,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            result_ttl: Self::DEFAULT_RESULT_TTL,
            async_timeout: Self::DEFAULT_ASYNC_TIMEOUT,
            replicas: 1,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new(Self::DEFAULT_NATS_URL)
    }
}
