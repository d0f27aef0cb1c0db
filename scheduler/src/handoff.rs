//! Where a finished item goes: the next stage's work subject (JetStream, de-duplicated),
//! or the requester's reply subject (core NATS). Header handling lives here alone.

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use natserve_protocol::{headers, Outcome};
use tracing::warn;

/// A header of a received message, as text.
pub fn header<'a>(msg: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

pub fn deadline_ms(msg: &jetstream::Message) -> Option<u64> {
    header(msg, headers::DEADLINE)?.parse().ok()
}

/// `X-Batch-Sizes` after this stage ran the item in a batch of `size`.
pub fn append_batch_size(previous: Option<&str>, size: usize) -> String {
    match previous {
        Some(p) if !p.is_empty() => format!("{p},{size}"),
        _ => size.to_string(),
    }
}

/// Headers for handing an item to stage `next`: the request's own, with a fresh
/// de-duplication id and the batch sizes so far.
pub fn handoff_headers(msg: &jetstream::Message, next: u32, batch_sizes: &str) -> HeaderMap {
    let mut h = msg.headers.clone().unwrap_or_default();
    let id = header(msg, headers::REQUEST_ID).unwrap_or("unknown");
    h.insert(headers::MSG_ID, format!("{id}.{next}").as_str());
    h.insert(headers::BATCH_SIZES, batch_sizes);
    h
}

/// The outcome a failed hand-off means for the request.
pub fn handoff_failure(err: &jetstream::context::PublishError) -> (Outcome, &'static str) {
    match err.kind() {
        PublishErrorKind::StreamNotFound => (Outcome::Unavailable, "next stage is not served"),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => (
            Outcome::Unavailable,
            "could not hand the request to the next stage",
        ),
        PublishErrorKind::MaxPayloadExceeded => (
            Outcome::ServerError,
            "intermediate result exceeds the NATS max_payload",
        ),
        _ if is_queue_full(err) => (Outcome::Overloaded, "next stage's queue is full"),
        _ => (
            Outcome::ServerError,
            "could not hand the request to the next stage",
        ),
    }
}

fn is_queue_full(err: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| e.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED)
}

/// Publishes the one reply a request gets. Messages without a reply subject were
/// submitted fire-and-forget and get none.
pub async fn reply(
    client: &async_nats::Client,
    msg: &jetstream::Message,
    outcome: Outcome,
    body: Bytes,
    batch_sizes: Option<&str>,
    content_type: &str,
) {
    let Some(to) = header(msg, headers::REPLY_TO) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(headers::STATUS, outcome.as_str());
    if let Some(id) = header(msg, headers::REQUEST_ID) {
        h.insert(headers::REQUEST_ID, id);
    }
    if let Some(sizes) = batch_sizes {
        h.insert(headers::BATCH_SIZES, sizes);
    }
    if outcome == Outcome::Ok {
        h.insert(headers::CONTENT_TYPE, content_type);
    }
    if let Err(e) = client.publish_with_headers(to.to_owned(), h, body).await {
        warn!(subject = to, error = %e, "reply publish failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_accumulate_per_stage() {
        assert_eq!(append_batch_size(None, 3), "3");
        assert_eq!(append_batch_size(Some(""), 3), "3");
        assert_eq!(append_batch_size(Some("3"), 8), "3,8");
    }
}
