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
/// On a streamed event (a core NATS message to the reply subject without [`STATUS`]): its
/// 1-based position in the item's stream. The ingress ends a stream whose events skip a
/// number with an error event, rather than showing the client a stream with a hole.
pub const EVENT_SEQ: &str = "X-Event-Seq";
/// On the reply that ends a stream: how many events came before it, so a lost last event
/// is noticed too. Absent means none.
pub const EVENT_COUNT: &str = "X-Event-Count";
/// JetStream de-duplication id: `<request id>.<stage>`.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// An asynchronous job's result id: whichever agent finishes the request writes its
/// outcome under this key of the results bucket (`crate::results`), instead of (or as
/// well as) replying to [`REPLY_TO`]. Such work is never dropped by a cancellation.
pub const RESULT_KEY: &str = "X-Result-Key";
/// Seconds the finished result is kept ([`RESULT_KEY`], [`REPLY_KEY`]); the default when absent.
pub const RESULT_TTL: &str = "X-Result-Ttl";
/// A synchronous request whose reply must outlive the broker: the agent that answers it
/// publishes the reply to [`REPLY_TO`], then writes it under this key of the results
/// bucket (`reply.<request id>`, the first answer stays) before it acks the work. An
/// ingress that lost replies (it reconnected, or the deadline came) reads them there. Unlike
/// [`RESULT_KEY`], such a request is still cancelled when its client goes away.
pub const REPLY_KEY: &str = "X-Reply-Key";
/// The body is in the payloads object store under this object name (the message's own
/// body is empty): see [`crate::payloads`].
pub const PAYLOAD_OBJECT: &str = "X-Payload-Object";
/// On a message carrying an envelope ([`crate::envelope`]): how many letters it holds.
pub const ENVELOPE: &str = "X-Envelope";
/// On a work message: its requester reads replies that come several to one message (an
/// [`crate::envelope`] to the reply subject of the first). Without it, each reply is a
/// message of its own, which is what any NATS client reads.
pub const REPLY_ENVELOPE: &str = "X-Reply-Envelope";

/// One header of a message, as text; `None` when the message has no headers or not this one.
pub fn get<'a>(headers: Option<&'a async_nats::HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// The message's deadline ([`DEADLINE`], unix ms); `None` when absent or not a number.
/// Every Rust reader of the header goes through here.
pub fn deadline_ms(headers: Option<&async_nats::HeaderMap>) -> Option<u64> {
    get(headers, DEADLINE)?.trim().parse().ok()
}

/// The trace id of a W3C `traceparent` (`<version>-<trace id>-<parent id>-<flags>`): its
/// 32 lowercase hex digits, `None` when the value is not one (or the all-zero invalid id).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut fields = traceparent.trim().split('-');
    let version = fields.next()?;
    let id = fields.next()?;
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = version.len() == 2
        && hex(version)
        && version != "ff"
        && id.len() == 32
        && hex(id)
        && id.bytes().any(|b| b != b'0');
    valid.then_some(id)
}

/// The message's trace id, from its [`TRACEPARENT`]; `""` when it came without one.
pub fn trace_id_of(headers: Option<&async_nats::HeaderMap>) -> &str {
    get(headers, TRACEPARENT).and_then(trace_id).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_id_is_the_second_field_of_a_valid_traceparent() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{id}-00f067aa0ba902b7-01")), Some(id));
        for bad in [
            "",
            "00",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
        let mut h = async_nats::HeaderMap::new();
        assert_eq!(trace_id_of(Some(&h)), "");
        h.insert(TRACEPARENT, format!("00-{id}-00f067aa0ba902b7-01").as_str());
        assert_eq!(trace_id_of(Some(&h)), id);
    }

    #[test]
    fn reads_a_deadline_in_unix_ms() {
        let mut h = async_nats::HeaderMap::new();
        assert_eq!(deadline_ms(None), None);
        assert_eq!(deadline_ms(Some(&h)), None);
        h.insert(DEADLINE, "1700000000123");
        assert_eq!(deadline_ms(Some(&h)), Some(1_700_000_000_123));
        h.insert(DEADLINE, "soon");
        assert_eq!(deadline_ms(Some(&h)), None);
        h.insert(REQUEST_ID, "abc");
        assert_eq!(get(Some(&h), REQUEST_ID), Some("abc"));
    }
}
