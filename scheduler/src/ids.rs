//! The ids a log line about requests carries: each message's request id (`X-Request-Id`)
//! and the trace id of its `traceparent`, when one came in. A line about one request has
//! `request_id` and `trace_id` fields; a line about a batch has `request_ids` and
//! `trace_ids`, comma-separated in batch order (an empty entry where an item has none),
//! formatted only when the line is actually written.

use std::fmt;

use async_nats::jetstream;
use natserve_protocol::headers;

/// The message's request id; `""` when it has none.
pub fn request_id(msg: &jetstream::Message) -> &str {
    headers::get(msg.headers.as_ref(), headers::REQUEST_ID).unwrap_or("")
}

/// The trace id of the message's `traceparent`; `""` when it came without one.
pub fn trace_id(msg: &jetstream::Message) -> &str {
    headers::trace_id_of(msg.headers.as_ref())
}

/// A batch's request ids, as a log field.
pub struct RequestIds<'a>(pub &'a [jetstream::Message]);

/// A batch's trace ids, as a log field.
pub struct TraceIds<'a>(pub &'a [jetstream::Message]);

fn join(
    f: &mut fmt::Formatter<'_>,
    msgs: &[jetstream::Message],
    id: fn(&jetstream::Message) -> &str,
) -> fmt::Result {
    for (i, msg) in msgs.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        f.write_str(id(msg))?;
    }
    Ok(())
}

impl fmt::Display for RequestIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        join(f, self.0, request_id)
    }
}

impl fmt::Display for TraceIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        join(f, self.0, trace_id)
    }
}
