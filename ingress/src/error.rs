//! The ingress's errors: [`Error`] stops [`crate::run`]; [`RequestError`] ends one request.
//!
//! A `RequestError` is never logged where it is raised: [`crate::status::answer`] turns it
//! into an HTTP status, and the HTTP layer logs server errors once.

use natserve_protocol::NameError;

/// Why the ingress could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Connect(#[from] natserve_protocol::nats::ConnectError),
    #[error(transparent)]
    Bucket(#[from] natserve_protocol::buckets::BucketError),
    #[error(transparent)]
    NotClustered(#[from] natserve_protocol::replicas::NotClustered),
    #[error("could not subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        source: async_nats::SubscribeError,
    },
    #[error("could not register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("http server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Why one request got no reply from a worker. Each maps to exactly one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no route {0}")]
    UnknownRoute(String),
    #[error("{route} accepts POST, not {method}")]
    MethodNotAllowed { route: String, method: String },
    #[error("request body is larger than {limit} bytes ({why})")]
    BodyTooLarge { limit: usize, why: &'static str },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive before the deadline")]
    BodyTimeout,
    #[error("this ingress is shutting down")]
    Draining,
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("no agent serves stage {stage} of {route}")]
    NoAgent { route: String, stage: u32 },
    #[error("the queue of {route} is full, retry later")]
    QueueFull { route: String },
    #[error("{route} is not served: its first stage has no stream")]
    NotServed { route: String },
    #[error("nats is unavailable: {0}")]
    Nats(String),
    #[error("no reply before the deadline")]
    DeadlinePassed,
    #[error("invalid reply: {0}")]
    BadReply(String),
    #[error(
        "Idempotency-Key must be 1 to {max} visible ASCII characters",
        max = natserve_protocol::records::MAX_IDEMPOTENCY_KEY
    )]
    BadIdempotencyKey,
    #[error("Idempotency-Key applies to asynchronous submits: add Prefer: respond-async")]
    IdempotencyNeedsAsync,
    #[error("result id {0:?} is not one: ids are 1 to 128 letters, digits, '_' and '-'")]
    BadResultId(String),
    #[error("no result {0}: the id is unknown, or its record expired (its TTL passed)")]
    UnknownResult(String),
    #[error("/results/<id> accepts GET, not {0}")]
    ResultMethodNotAllowed(String),
    #[error(
        "job {0} passed its deadline and no agent answered it (were all agents of its route gone?)"
    )]
    JobUnanswered(String),
    #[error("results bucket unavailable: {0}")]
    Results(String),
    #[error("{0} streams its answer as events: it cannot be submitted with Prefer: respond-async")]
    AsyncStream(String),
    #[error("stream broken: {0}")]
    StreamBroken(String),
    /// A body over one NATS message could not go into the payloads store.
    #[error("the request body could not be stored for the pipeline: {0}")]
    PayloadStore(String),
    /// The pipeline answered with a claim check whose object could not be read.
    #[error("the result could not be delivered: {0}")]
    ReplyPayload(String),
}
