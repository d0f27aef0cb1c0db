//! A request's reply: an asynchronous job's record first (it is the answer), then the
//! core NATS message, then the durable record of a request whose reply must outlive the
//! broker (`X-Reply-Key`): a connected requester has its answer without waiting for the
//! record, which is for an ingress that lost the reply and reads it after reconnecting.
//! The replies one requester gets from one batch go as one envelope
//! ([`natserve_protocol::envelope`]) when it said it reads them (`X-Reply-Envelope`): one
//! broker message for the batch instead of one per request.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use natserve_protocol::envelope::{self, Letter};
use natserve_protocol::payloads::{self, Hop};
use natserve_protocol::{headers, Outcome};
use tracing::warn;

use super::{header, Outbox};

/// A request of a batch answered here (not handed on): what its reply says.
pub(super) struct Answer<'m> {
    pub msg: &'m jetstream::Message,
    pub outcome: Outcome,
    pub body: Bytes,
    pub sizes: String,
    /// Stream events it sent before this, its last word.
    pub events: u32,
}

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
    /// Answers a batch's requests: records of asynchronous jobs, then the replies (an
    /// envelope per requester that reads them), then each request's durable reply record
    /// and its ack, all at once, so a record waiting for its bucket holds no other back.
    pub(super) async fn answer(&self, answered: Vec<Answer<'_>>) {
        let replies = futures::future::join_all(answered.iter().map(|a| async move {
            self.store_job_result(a.msg, a.outcome, &a.body, Some(&a.sizes))
                .await;
            self.make_reply(
                a.msg,
                a.outcome,
                a.body.clone(),
                Some(&a.sizes),
                a.events,
                &self.mime,
            )
            .await
        }))
        .await;
        self.send_replies(replies.into_iter().flatten().collect())
            .await;
        futures::future::join_all(answered.iter().map(|a| async move {
            self.record_reply_of(a.msg, a.outcome, &a.body, Some(&a.sizes))
                .await;
            self.settle(a.msg, AckKind::Ack).await;
        }))
        .await;
    }

    /// Publishes the one reply a request gets, with its records (see the module's
    /// documentation).
    pub(super) async fn reply(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: Bytes,
        batch_sizes: Option<&str>,
        events: u32,
    ) {
        self.store_job_result(msg, outcome, &body, batch_sizes)
            .await;
        if let Some(reply) = self
            .make_reply(msg, outcome, body.clone(), batch_sizes, events, &self.mime)
            .await
        {
            self.send_one(reply).await;
        }
        self.record_reply_of(msg, outcome, &body, batch_sizes).await;
    }

    /// Publishes a reply over core NATS only, no record written; `mime` is the media type
    /// of an `ok` body.
    pub(super) async fn publish_reply(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: Bytes,
        batch_sizes: Option<&str>,
        events: u32,
        mime: &str,
    ) {
        if let Some(reply) = self
            .make_reply(msg, outcome, body, batch_sizes, events, mime)
            .await
        {
            self.send_one(reply).await;
        }
    }

    /// An asynchronous job's final record (`X-Result-Key`), if `msg` is one.
    async fn store_job_result(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: &[u8],
        batch_sizes: Option<&str>,
    ) {
        if let Some(key) = header(msg, headers::RESULT_KEY) {
            self.store_result(msg, key, outcome, body, batch_sizes)
                .await;
        }
    }

    /// The durable record of a synchronous reply (`X-Reply-Key`), if `msg` asks for one.
    async fn record_reply_of(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: &[u8],
        batch_sizes: Option<&str>,
    ) {
        if header(msg, headers::RESULT_KEY).is_some() {
            return;
        }
        if let Some(key) = header(msg, headers::REPLY_KEY) {
            self.record_reply(msg, key, outcome, body, batch_sizes)
                .await;
        }
    }

    /// The core NATS reply to `msg`'s requester, if it has one this agent may publish to
    /// (a message without a reply subject was submitted fire-and-forget). A body over one
    /// NATS message goes as a claim check; one that cannot be stored is answered
    /// `server_error` with the reason, so the requester never waits out its deadline.
    async fn make_reply(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: Bytes,
        batch_sizes: Option<&str>,
        events: u32,
        mime: &str,
    ) -> Option<Reply> {
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
                h.insert(headers::CONTENT_TYPE, mime);
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
