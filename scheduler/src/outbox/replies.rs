//! A request's reply: its durable record where it asks for one, then its core NATS
//! message. The replies one ingress gets from one batch go as one envelope
//! ([`natserve_protocol::envelope`]) when the ingress said it reads them
//! (`X-Reply-Envelope`): one broker message for the batch instead of one per request.

use std::collections::BTreeMap;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use natserve_protocol::envelope::{self, Letter};
use natserve_protocol::payloads::{self, Hop};
use natserve_protocol::{headers, Outcome};
use tracing::warn;

use super::{header, Outbox};

/// One reply, ready to go.
pub(super) struct Reply {
    to: String,
    headers: HeaderMap,
    body: Bytes,
    /// The object its body went to, when it was over one NATS message.
    claim: Option<String>,
    /// What goes instead should the publish fail: `server_error`, saying why.
    fallback: HeaderMap,
    /// The requester reads envelopes.
    enveloped: bool,
}

/// The body of the `server_error` that replaces a result that could not be delivered.
pub(super) fn undeliverable(why: &str) -> Bytes {
    Bytes::from(format!(
        "internal error: the result could not be delivered: {why}"
    ))
}

impl Outbox {
    /// Publishes the one reply a request gets: see [`Outbox::prepare_reply`].
    pub(super) async fn reply(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: Bytes,
        batch_sizes: Option<&str>,
        events: u32,
    ) {
        if let Some(reply) = self
            .prepare_reply(msg, outcome, body, batch_sizes, events)
            .await
        {
            self.send_one(reply).await;
        }
    }

    /// Writes a request's durable record, for an asynchronous job or a request whose
    /// reply must outlive the broker, and makes its core NATS reply. Messages without a
    /// reply subject were submitted fire-and-forget and get none. A body over one NATS
    /// message goes as a claim check; one that cannot be stored is answered
    /// `server_error` with the reason, so the requester never waits out its deadline.
    pub(super) async fn prepare_reply(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: Bytes,
        batch_sizes: Option<&str>,
        events: u32,
    ) -> Option<Reply> {
        if let Some(key) = header(msg, headers::RESULT_KEY) {
            self.store_result(msg, key, outcome, &body, batch_sizes)
                .await;
        } else if let Some(key) = header(msg, headers::REPLY_KEY) {
            self.record_reply(msg, key, outcome, &body, batch_sizes)
                .await;
        }
        let to = self.trusted_reply_subject(msg)?;
        let (mut outcome, mut body, mut claim) = (outcome, body, None);
        if !payloads::fits_inline(&self.client, body.len()) {
            match self.check_in(msg, Hop::Reply, &body).await {
                Ok(name) => (body, claim) = (Bytes::new(), Some(name)),
                Err(e) => {
                    warn!(route = %self.route, stage = self.stage, error = %e, "cannot store a reply");
                    outcome = Outcome::ServerError;
                    body = undeliverable(&e.to_string());
                }
            }
        }
        let reply_headers = |outcome: Outcome, claim: Option<&str>| {
            let mut h = HeaderMap::new();
            if events > 0 {
                h.insert(headers::EVENT_COUNT, events.to_string());
            }
            h.insert(headers::STATUS, outcome.as_str());
            if let Some(id) = header(msg, headers::REQUEST_ID) {
                h.insert(headers::REQUEST_ID, id);
            }
            if let Some(sizes) = batch_sizes {
                h.insert(headers::BATCH_SIZES, sizes);
            }
            if outcome == Outcome::Ok {
                h.insert(headers::CONTENT_TYPE, self.mime.as_str());
            }
            if let Some(name) = claim {
                h.insert(headers::PAYLOAD_OBJECT, name);
            }
            h
        };
        Some(Reply {
            to: to.to_owned(),
            headers: reply_headers(outcome, claim.as_deref()),
            body,
            fallback: reply_headers(Outcome::ServerError, None),
            claim,
            enveloped: header(msg, headers::REPLY_ENVELOPE) == Some("1"),
        })
    }

    /// Sends `replies`: those for one requester that reads envelopes as one envelope to
    /// the reply subject of the first, every other one as a message of its own.
    pub(super) async fn send_replies(&self, replies: Vec<Reply>) {
        let mut by_requester: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, reply) in replies.iter().enumerate() {
            if reply.enveloped {
                let requester = reply.to.rsplit_once('.').map_or("", |(prefix, _)| prefix);
                by_requester.entry(requester).or_default().push(i);
            }
        }
        let groups: Vec<Vec<usize>> = by_requester
            .into_values()
            .filter(|group| group.len() > 1)
            .collect();
        let mut slots: Vec<Option<Reply>> = replies.into_iter().map(Some).collect();
        for group in groups {
            let mut letters: Vec<Reply> = group.iter().filter_map(|&i| slots[i].take()).collect();
            if let Err(unsent) = self.send_envelope(&letters).await {
                warn!(error = %unsent, letters = letters.len(), "reply envelope not sent; sending each reply alone");
                for reply in letters.drain(..) {
                    self.send_one(reply).await;
                }
            }
        }
        for reply in slots.into_iter().flatten() {
            self.send_one(reply).await;
        }
    }

    async fn send_envelope(&self, replies: &[Reply]) -> Result<(), String> {
        let letters: Vec<Letter> = replies
            .iter()
            .map(|r| Letter::new(&r.headers, r.body.clone()))
            .collect();
        let body = envelope::encode(&letters).map_err(|e| e.to_string())?;
        if !payloads::fits_inline(&self.client, body.len()) {
            return Err("larger than one NATS message".to_owned());
        }
        let mut h = HeaderMap::new();
        h.insert(headers::ENVELOPE, letters.len().to_string());
        self.client
            .publish_with_headers(replies[0].to.clone(), h, body)
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes one reply; should that fail, a `server_error` saying why.
    async fn send_one(&self, reply: Reply) {
        let Reply {
            to,
            headers,
            body,
            claim,
            fallback,
            ..
        } = reply;
        let Err(e) = self
            .client
            .publish_with_headers(to.clone(), headers, body)
            .await
        else {
            return;
        };
        warn!(subject = to, error = %e, "reply publish failed; answering server_error");
        if let Some(name) = claim {
            self.payloads.delete(&name).await;
        }
        let body = undeliverable(&e.to_string());
        if let Err(e) = self
            .client
            .publish_with_headers(to.clone(), fallback, body)
            .await
        {
            warn!(subject = to, error = %e, "reply publish failed");
        }
    }
}
