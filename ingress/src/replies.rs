//! Replies: one wildcard subscription per ingress, routed to waiting requests by id.
//!
//! The ingress subscribes once to `<reply_prefix>.*`; the last subject token of each reply
//! is the request id. A request registers before it publishes (a reply can beat the
//! publish ack) and its [`PendingReply`] removes the entry when dropped, whether the reply
//! came, the deadline passed, or the client went away and axum dropped the handler.
//!
//! A request to a streaming route registers a stream instead ([`Replies::register_stream`]):
//! it gets every message on its subject, the numbered events (`X-Event-Seq`) and then the
//! reply, which ends its entry. Its channel is bounded: a client reading
//! slower than the worker streams loses events, and the gap in their numbers ends the
//! stream with an error (see `crate::stream`), instead of this ingress buffering without
//! end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::{Message, Subscriber};
use futures::StreamExt;
use natserve_protocol::payloads::{self, Payloads};
use natserve_protocol::{envelope, headers};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Messages of one stream held for a client that has not read them yet.
pub const STREAM_BUFFER: usize = 1024;

#[derive(Debug)]
enum Waiter {
    Reply(oneshot::Sender<Message>),
    Stream(mpsc::Sender<Message>),
}

/// In-flight requests of this ingress waiting for their reply.
#[derive(Debug)]
pub struct Replies {
    prefix: String,
    pending: Mutex<HashMap<String, Waiter>>,
}

impl Replies {
    /// `prefix` is [`natserve_protocol::Names::reply_prefix`] of this ingress.
    pub fn new(prefix: String) -> Arc<Self> {
        Arc::new(Self {
            prefix,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The subject this ingress subscribes to for all its replies.
    pub fn wildcard(&self) -> String {
        format!("{}.*", self.prefix)
    }

    /// The reply subject of one request.
    pub fn subject(&self, request_id: &str) -> String {
        format!("{}.{request_id}", self.prefix)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts waiting for the reply to `request_id`.
    pub fn register(self: &Arc<Self>, request_id: &str) -> PendingReply {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request_id.to_owned(), Waiter::Reply(tx));
        PendingReply {
            _claim: Claim::new(self, request_id),
            rx,
        }
    }

    /// Starts taking every message to `request_id`'s subject: stream events, then its reply.
    pub fn register_stream(self: &Arc<Self>, request_id: &str) -> PendingStream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        self.lock()
            .insert(request_id.to_owned(), Waiter::Stream(tx));
        PendingStream {
            claim: Claim::new(self, request_id),
            rx,
        }
    }

    /// Hands a reply to the request waiting for it. False when nobody waits any more
    /// (a late reply after the deadline, or a client that disconnected), or when a stream's
    /// buffer is full (the message is dropped; its number shows the gap).
    pub fn deliver(&self, message: Message) -> bool {
        let Some(id) = message.subject.rsplit('.').next() else {
            return false;
        };
        // Anything but a numbered event ends the request: its reply, or a malformed one
        // (which the request then reports).
        let ends = headers::get(message.headers.as_ref(), headers::EVENT_SEQ).is_none();
        let mut pending = self.lock();
        match pending.get(id) {
            None => {
                debug!(subject = %message.subject, "reply for no waiting request");
                return false;
            }
            Some(Waiter::Stream(tx)) if !ends => return tx.try_send(message).is_ok(),
            Some(Waiter::Reply(_)) if !ends => {
                debug!(subject = %message.subject, "stream event for a request that does not stream; dropped");
                return false;
            }
            Some(_) => {}
        }
        let waiter = pending.remove(id);
        drop(pending);
        match waiter {
            None => false,
            Some(Waiter::Reply(tx)) => tx.send(message).is_ok(),
            // The reply that ends a stream waits for room: it is the one message a
            // stream must not lose.
            Some(Waiter::Stream(tx)) => match tx.try_send(message) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(message)) => {
                    tokio::spawn(async move { tx.send(message).await.is_ok() });
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
        }
    }

    /// The messages `message` carries: itself, or, for an envelope of replies (an agent
    /// answering several of our requests at once), one message per letter, on the reply
    /// subject of the request its `X-Request-Id` names. A malformed envelope is dropped
    /// with a warning: its requests get their deadline's answer.
    pub fn open(&self, message: Message) -> Vec<Message> {
        if headers::get(message.headers.as_ref(), headers::ENVELOPE).is_none() {
            return vec![message];
        }
        let letters = match envelope::decode(&message.payload) {
            Ok(letters) => letters,
            Err(e) => {
                warn!(subject = %message.subject, error = %e, "malformed reply envelope dropped");
                return Vec::new();
            }
        };
        letters
            .into_iter()
            .filter_map(|letter| {
                let id = letter.header(headers::REQUEST_ID)?;
                let headers = letter
                    .header_map()
                    .map_err(
                        |e| warn!(request_id = id, error = %e, "malformed reply letter dropped"),
                    )
                    .ok()?;
                Some(Message {
                    subject: self.subject(id).into(),
                    reply: None,
                    length: letter.body.len(),
                    payload: letter.body,
                    headers: Some(headers),
                    status: None,
                    description: None,
                })
            })
            .collect()
    }

    /// Requests waiting for a reply now.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }
}

/// Routes every message of the reply subscription until it ends (when the client drains).
/// A reply nobody waits for that came as a claim check has its object deleted: no one
/// else would.
pub async fn dispatch(mut subscription: Subscriber, replies: Arc<Replies>, store: Payloads) {
    while let Some(message) = subscription.next().await {
        for message in replies.open(message) {
            deliver(&replies, &store, message);
        }
    }
    debug!("reply subscription ended");
}

fn deliver(replies: &Replies, store: &Payloads, message: Message) {
    let claim = payloads::claim(message.headers.as_ref()).map(str::to_owned);
    if replies.deliver(message) {
        return;
    }
    if let Some(name) = claim {
        let store = store.clone();
        tokio::spawn(async move { store.delete(&name).await });
    }
}

/// One request's entry in [`Replies`]; dropping it removes the entry.
#[derive(Debug)]
struct Claim {
    request_id: String,
    replies: Arc<Replies>,
}

impl Claim {
    fn new(replies: &Arc<Replies>, request_id: &str) -> Self {
        Self {
            request_id: request_id.to_owned(),
            replies: replies.clone(),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.replies.lock().remove(&self.request_id);
    }
}

/// One request's claim on its reply; dropping it withdraws the claim.
#[derive(Debug)]
pub struct PendingReply {
    /// Held for its `Drop`.
    _claim: Claim,
    rx: oneshot::Receiver<Message>,
}

impl PendingReply {
    /// The reply, or `None` if the dispatcher went away (the client is shutting down).
    pub async fn recv(&mut self) -> Option<Message> {
        (&mut self.rx).await.ok()
    }
}

/// One streaming request's claim on the messages to its subject.
#[derive(Debug)]
pub struct PendingStream {
    claim: Claim,
    rx: mpsc::Receiver<Message>,
}

impl PendingStream {
    /// The next event or the reply; `None` if the dispatcher went away.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    pub fn request_id(&self) -> &str {
        &self.claim.request_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reply_to(subject: &str, body: &'static str) -> Message {
        Message {
            subject: subject.into(),
            reply: None,
            payload: Bytes::from_static(body.as_bytes()),
            headers: None,
            status: None,
            description: None,
            length: body.len(),
        }
    }

    #[tokio::test]
    async fn an_envelope_of_replies_opens_into_one_message_per_request() {
        use natserve_protocol::envelope::{encode, Letter};
        let replies = Replies::new("ns.reply.ing1".into());
        let letter = |id: &str, status: &str, body: &'static str| Letter {
            headers: vec![
                (headers::REQUEST_ID.to_owned(), id.to_owned()),
                (headers::STATUS.to_owned(), status.to_owned()),
            ],
            body: Bytes::from_static(body.as_bytes()),
        };
        let mut envelope = reply_to("ns.reply.ing1.r1", "");
        envelope.payload = encode(&[
            letter("r1", "ok", "one"),
            letter("r2", "client_error", "two"),
        ])
        .unwrap();
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::ENVELOPE, "2");
        envelope.headers = Some(h);
        let opened = replies.open(envelope.clone());
        let seen: Vec<(&str, &str, &[u8])> = opened
            .iter()
            .map(|m| {
                let status = headers::get(m.headers.as_ref(), headers::STATUS).unwrap();
                (m.subject.as_str(), status, m.payload.as_ref())
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("ns.reply.ing1.r1", "ok", &b"one"[..]),
                ("ns.reply.ing1.r2", "client_error", &b"two"[..])
            ]
        );
        let mut a = replies.register("r1");
        let mut b = replies.register("r2");
        for message in opened {
            assert!(replies.deliver(message));
        }
        assert_eq!(a.recv().await.unwrap().payload, "one");
        assert_eq!(b.recv().await.unwrap().payload, "two");
        // A plain reply is itself; a malformed envelope carries nothing.
        assert_eq!(replies.open(reply_to("ns.reply.ing1.r3", "x")).len(), 1);
        envelope.payload = Bytes::from_static(b"\x00\x05");
        assert!(replies.open(envelope).is_empty());
    }

    #[tokio::test]
    async fn routes_replies_by_the_last_subject_token() {
        let replies = Replies::new("ns.reply.ing1".into());
        assert_eq!(replies.wildcard(), "ns.reply.ing1.*");
        assert_eq!(replies.subject("r1"), "ns.reply.ing1.r1");

        let mut a = replies.register("r1");
        let mut b = replies.register("r2");
        assert_eq!(replies.waiting(), 2);

        assert!(replies.deliver(end_with("ns.reply.ing1.r2", "two")));
        assert!(replies.deliver(end_with("ns.reply.ing1.r1", "one")));
        assert_eq!(b.recv().await.unwrap().payload, "two");
        assert_eq!(a.recv().await.unwrap().payload, "one");
        assert_eq!(replies.waiting(), 0, "delivery removes the entry");
        assert!(!replies.deliver(end_with("ns.reply.ing1.r1", "again")));
    }

    fn end_with(subject: &str, body: &'static str) -> Message {
        let mut m = reply_to(subject, body);
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::STATUS, "ok");
        m.headers = Some(h);
        m
    }

    fn event(subject: &str, seq: &str) -> Message {
        let mut m = reply_to(subject, "e");
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::EVENT_SEQ, seq);
        m.headers = Some(h);
        m
    }

    fn end(subject: &str) -> Message {
        let mut m = reply_to(subject, "done");
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::STATUS, "ok");
        m.headers = Some(h);
        m
    }

    #[tokio::test]
    async fn a_stream_gets_its_events_then_the_reply_that_ends_it() {
        let replies = Replies::new("p".into());
        let mut s = replies.register_stream("r1");
        assert!(replies.deliver(event("p.r1", "1")));
        assert!(replies.deliver(event("p.r1", "2")));
        assert!(replies.deliver(end("p.r1")));
        assert_eq!(replies.waiting(), 0, "the reply ends the entry");
        assert!(
            !replies.deliver(event("p.r1", "3")),
            "nothing after the end"
        );
        for want in ["1", "2"] {
            let m = s.recv().await.unwrap();
            assert_eq!(
                headers::get(m.headers.as_ref(), headers::EVENT_SEQ),
                Some(want)
            );
        }
        assert_eq!(s.recv().await.unwrap().payload, "done");
    }

    #[tokio::test]
    async fn an_event_for_a_plain_request_is_dropped_and_the_reply_still_comes() {
        let replies = Replies::new("p".into());
        let mut r = replies.register("r1");
        assert!(!replies.deliver(event("p.r1", "1")));
        assert!(replies.deliver(end("p.r1")));
        assert_eq!(r.recv().await.unwrap().payload, "done");
    }

    #[test]
    fn dropping_the_claim_removes_the_entry() {
        let replies = Replies::new("p".into());
        let pending = replies.register("gone");
        assert_eq!(replies.waiting(), 1);
        drop(pending);
        assert_eq!(replies.waiting(), 0);
        assert!(!replies.deliver(reply_to("p.gone", "late")));
    }
}
