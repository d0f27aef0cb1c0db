//! One streaming request's answer as it arrives: numbered events, then the reply that
//! ends them, checked on the way so a broken stream ends instead of hanging or lying.
//!
//! The stream ends with an error rather than waiting for ever when an event number is
//! skipped or repeated (core NATS dropped one, or an event came from a run the agent
//! gave up), when the reply says more events were sent than arrived, or when the deadline
//! passes before the reply: the deadline bounds the whole stream, as Mosec's `--timeout`
//! bounds an SSE task.

use bytes::Bytes;
use natserve_protocol::headers;
use tokio::time::Instant;

use crate::error::RequestError;
use crate::replies::PendingStream;
use crate::submit::{CancelOnDrop, Reply};

/// What comes next on a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// One event's text, as the worker sent it.
    Event(Bytes),
    /// The end: the reply (an error outcome is the client's error event), or why the
    /// stream broke. Nothing follows it.
    End(Result<Reply, RequestError>),
}

/// A request's stream, owned by its HTTP response body: dropping it before the end (the
/// client went away) cancels the request, which reaches its worker if it is running.
#[derive(Debug)]
pub struct ReplyStream {
    pending: PendingStream,
    /// When the reply must be in.
    give_up: Instant,
    cancel: CancelOnDrop,
    order: EventOrder,
    ended: bool,
}

impl ReplyStream {
    pub fn new(pending: PendingStream, give_up: Instant, cancel: CancelOnDrop) -> Self {
        Self {
            pending,
            give_up,
            cancel,
            order: EventOrder::default(),
            ended: false,
        }
    }

    pub fn request_id(&self) -> &str {
        self.pending.request_id()
    }

    /// The next event or the end; `None` after the end.
    pub async fn next(&mut self) -> Option<StreamItem> {
        if self.ended {
            return None;
        }
        let item = match tokio::time::timeout_at(self.give_up, self.pending.recv()).await {
            Err(_) => StreamItem::End(Err(RequestError::DeadlinePassed)),
            Ok(None) => {
                StreamItem::End(Err(RequestError::Nats("reply subscription closed".into())))
            }
            Ok(Some(message)) => self.order.check(message),
        };
        if let StreamItem::End(_) = item {
            self.ended = true;
            // After its reply nothing runs for this request; after a broken stream its
            // worker may still be streaming, and the cancel sent on drop stops it.
            self.cancel.armed = matches!(item, StreamItem::End(Err(_)));
        }
        Some(item)
    }
}

/// Events received so far, and what the next message must be.
#[derive(Debug, Default)]
pub struct EventOrder {
    received: u32,
}

impl EventOrder {
    /// What `message` means after the events before it.
    pub fn check(&mut self, message: async_nats::Message) -> StreamItem {
        let h = message.headers.as_ref();
        if let Some(seq) = headers::get(h, headers::EVENT_SEQ) {
            let want = self.received + 1;
            return match seq.trim().parse::<u32>() {
                Ok(got) if got == want => {
                    self.received = got;
                    StreamItem::Event(message.payload)
                }
                Ok(got) => StreamItem::End(Err(RequestError::StreamBroken(format!(
                    "event {got} arrived where event {want} was due; events were lost"
                )))),
                Err(_) => StreamItem::End(Err(RequestError::BadReply(format!(
                    "{} is not a number: {seq:?}",
                    headers::EVENT_SEQ
                )))),
            };
        }
        let sent = headers::get(h, headers::EVENT_COUNT)
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if sent != self.received {
            return StreamItem::End(Err(RequestError::StreamBroken(format!(
                "the worker sent {sent} events and {} arrived",
                self.received
            ))));
        }
        StreamItem::End(Reply::from_message(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natserve_protocol::Outcome;

    fn message(h: &[(&str, &str)], body: &'static str) -> async_nats::Message {
        let mut headers = async_nats::HeaderMap::new();
        for &(k, v) in h {
            headers.insert(k, v);
        }
        async_nats::Message {
            subject: "p.r".into(),
            reply: None,
            payload: Bytes::from_static(body.as_bytes()),
            headers: Some(headers),
            status: None,
            description: None,
            length: body.len(),
        }
    }

    fn broken(item: StreamItem) -> bool {
        matches!(item, StreamItem::End(Err(RequestError::StreamBroken(_))))
    }

    #[test]
    fn numbered_events_then_a_reply_that_counts_them() {
        let mut order = EventOrder::default();
        for (seq, text) in [("1", "a"), ("2", "b")] {
            let got = order.check(message(&[(headers::EVENT_SEQ, seq)], text));
            assert_eq!(got, StreamItem::Event(Bytes::from_static(text.as_bytes())));
        }
        let end = order.check(message(
            &[(headers::STATUS, "ok"), (headers::EVENT_COUNT, "2")],
            "",
        ));
        assert!(matches!(
            end,
            StreamItem::End(Ok(Reply {
                outcome: Outcome::Ok,
                ..
            }))
        ));
    }

    #[test]
    fn a_skipped_or_repeated_number_breaks_the_stream() {
        let mut order = EventOrder::default();
        assert!(broken(
            order.check(message(&[(headers::EVENT_SEQ, "2")], "x"))
        ));
        let mut order = EventOrder::default();
        order.check(message(&[(headers::EVENT_SEQ, "1")], "x"));
        assert!(broken(
            order.check(message(&[(headers::EVENT_SEQ, "1")], "x"))
        ));
    }

    #[test]
    fn a_reply_counting_more_events_than_arrived_breaks_the_stream() {
        let mut order = EventOrder::default();
        order.check(message(&[(headers::EVENT_SEQ, "1")], "x"));
        let end = order.check(message(
            &[(headers::STATUS, "ok"), (headers::EVENT_COUNT, "3")],
            "",
        ));
        assert!(broken(end));
        // An error from an earlier stage ends a stream that never started.
        let mut order = EventOrder::default();
        let end = order.check(message(&[(headers::STATUS, "validation_error")], "bad"));
        assert!(matches!(
            end,
            StreamItem::End(Ok(Reply {
                outcome: Outcome::ValidationError,
                ..
            }))
        ));
    }
}
