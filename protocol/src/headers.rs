//! Header names carried on work messages and replies.
//!
//! Application headers use an `X-` prefix because `Nats-` is reserved by the server.

/// Request id assigned by the ingress (a UUID); also echoed to the HTTP client.
pub const REQUEST_ID: &str = "X-Request-Id";
/// Core NATS subject the last stage (or any stage that fails the item) replies to.
pub const REPLY_TO: &str = "X-Reply-To";
/// Absolute deadline, unix milliseconds. Work past it is answered `timeout`, never run.
pub const DEADLINE: &str = "X-Deadline";
/// Comma-separated batch sizes, one per stage already run, appended by each agent.
pub const BATCH_SIZES: &str = "X-Batch-Sizes";
/// Outcome of a reply: see [`crate::Outcome`].
pub const STATUS: &str = "X-Status";
/// Media type of a successful reply body.
pub const CONTENT_TYPE: &str = "Content-Type";
/// W3C trace context, passed through untouched.
pub const TRACEPARENT: &str = "traceparent";
/// JetStream de-duplication id: `<request id>.<stage>`.
pub const MSG_ID: &str = "Nats-Msg-Id";
