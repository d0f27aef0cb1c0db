//! Replies: one wildcard subscription per ingress, routed to waiting requests by id.
//!
//! The ingress subscribes once to `<reply_prefix>.*`; the last subject token of each reply
//! is the request id. A request registers before it publishes (a reply can beat the
//! publish ack) and its [`PendingReply`] removes the entry when dropped, whether the reply
//! came, the deadline passed, or the client went away and axum dropped the handler.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::{Message, Subscriber};
use futures::StreamExt;
use natserve_protocol::payloads::{self, Payloads};
use tokio::sync::oneshot;
use tracing::debug;

/// In-flight requests of this ingress waiting for their reply.
#[derive(Debug)]
pub struct Replies {
    prefix: String,
    pending: Mutex<HashMap<String, oneshot::Sender<Message>>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Message>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts waiting for the reply to `request_id`.
    pub fn register(self: &Arc<Self>, request_id: &str) -> PendingReply {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request_id.to_owned(), tx);
        PendingReply {
            request_id: request_id.to_owned(),
            replies: self.clone(),
            rx,
        }
    }

    /// Hands a reply to the request waiting for it; gives it back (`Some`) when nobody
    /// waits any more (a late reply after the deadline, or a client that disconnected).
    pub fn deliver(&self, message: Message) -> Option<Message> {
        let Some(tx) = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|id| self.lock().remove(id))
        else {
            debug!(subject = %message.subject, "reply for no waiting request");
            return Some(message);
        };
        tx.send(message).err()
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
        let Some(unclaimed) = replies.deliver(message) else {
            continue;
        };
        if let Some(name) = payloads::claim(unclaimed.headers.as_ref()) {
            let (store, name) = (store.clone(), name.to_owned());
            tokio::spawn(async move { store.delete(&name).await });
        }
    }
    debug!("reply subscription ended");
}

/// One request's claim on its reply; dropping it withdraws the claim.
#[derive(Debug)]
pub struct PendingReply {
    request_id: String,
    replies: Arc<Replies>,
    rx: oneshot::Receiver<Message>,
}

impl PendingReply {
    /// The reply, or `None` if the dispatcher went away (the client is shutting down).
    pub async fn recv(&mut self) -> Option<Message> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.replies.lock().remove(&self.request_id);
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
    async fn routes_replies_by_the_last_subject_token() {
        let replies = Replies::new("ns.reply.ing1".into());
        assert_eq!(replies.wildcard(), "ns.reply.ing1.*");
        assert_eq!(replies.subject("r1"), "ns.reply.ing1.r1");

        let mut a = replies.register("r1");
        let mut b = replies.register("r2");
        assert_eq!(replies.waiting(), 2);

        assert!(replies
            .deliver(reply_to("ns.reply.ing1.r2", "two"))
            .is_none());
        assert!(replies
            .deliver(reply_to("ns.reply.ing1.r1", "one"))
            .is_none());
        assert_eq!(b.recv().await.unwrap().payload, "two");
        assert_eq!(a.recv().await.unwrap().payload, "one");
        assert_eq!(replies.waiting(), 0, "delivery removes the entry");
        assert!(replies
            .deliver(reply_to("ns.reply.ing1.r1", "again"))
            .is_some());
    }

    #[test]
    fn dropping_the_claim_removes_the_entry() {
        let replies = Replies::new("p".into());
        let pending = replies.register("gone");
        assert_eq!(replies.waiting(), 1);
        drop(pending);
        assert_eq!(replies.waiting(), 0);
        assert!(replies.deliver(reply_to("p.gone", "late")).is_some());
    }
}
