//! Hand-offs: a batch's results for the next stage of their routes, published to its
//! work stream. Those for one next stage go as one envelope
//! ([`natserve_protocol::envelope`]): one JetStream message and one ack for the batch
//! instead of one per item. A result alone goes as a message of its own, with its
//! `Nats-Msg-Id`, so JetStream drops the copy a rerun would hand on; letters of an
//! envelope have none, and a rerun's copies run again at the next stage and are
//! answered once (the first reply wins).
//!
//! A next stage this agent hosts takes results without the stream while its workers
//! have room ([`crate::local`]).
//!
//! Hand-backs: work an agent pulled but will not start soon goes to its own stage's
//! stream again ([`Outbox::hand_back`]), the same way.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use natserve_protocol::envelope::{self, Letter};
use natserve_protocol::{headers, payloads};

use super::Outbox;

/// One result on its way to the next stage of its route.
pub(super) struct Handoff<'m> {
    pub msg: &'m jetstream::Message,
    pub next: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// `X-Batch-Sizes` so far, for the answer should the hand-off fail.
    pub sizes: String,
    /// The object its body went to, when over one NATS message.
    pub claim: Option<String>,
}

impl Handoff<'_> {
    /// The result as a letter for the next stage on this agent: its input's ack
    /// subject, so settling the letter settles the input.
    fn letter(&self) -> jetstream::Message {
        jetstream::Message {
            message: async_nats::Message {
                subject: self.next.as_str().into(),
                reply: self.msg.reply.clone(),
                length: self.body.len(),
                headers: Some(self.headers.clone()),
                payload: self.body.clone(),
                status: None,
                description: None,
            },
            context: self.msg.context.clone(),
        }
    }
}

impl Outbox {
    /// Publishes `handoffs`, grouped by next stage, and acks each input once JetStream
    /// acked its hand-off; one that cannot be handed on is answered now. Those the next
    /// stage on this agent takes skip the stream, and their inputs stay unacked.
    pub(super) async fn hand_off(&self, handoffs: Vec<Handoff<'_>>) {
        let mut by_next: BTreeMap<String, Vec<Handoff<'_>>> = BTreeMap::new();
        for handoff in handoffs {
            by_next
                .entry(handoff.next.clone())
                .or_default()
                .push(handoff);
        }
        let mut sent = Vec::new();
        for (next, group) in by_next {
            let group = self.keep_here(&next, group);
            for chunk in self.fitting(group) {
                match self.publish_chunk(&next, &chunk).await {
                    Ok(ack) => sent.push((chunk, ack)),
                    Err(e) => {
                        for h in chunk {
                            self.fail_handoff(h.msg, &e, &h.sizes, h.claim).await;
                        }
                    }
                }
            }
        }
        for (chunk, pub_ack) in sent {
            match pub_ack.await {
                Ok(ack) => {
                    for h in chunk {
                        // A rerun's hand-off that JetStream de-duplicated: the object the
                        // first run handed on is the one the next stage reads.
                        if let (true, Some(name)) = (ack.duplicate, &h.claim) {
                            self.payloads.delete(name).await;
                        }
                        self.settle(h.msg, AckKind::Ack).await;
                    }
                }
                Err(e) => {
                    for h in chunk {
                        self.fail_handoff(h.msg, &e, &h.sizes, h.claim).await;
                    }
                }
            }
        }
    }

    /// Leaves `group` (for stage `next`) with that stage where this agent hosts it
    /// ([`crate::local`]): each as a letter with its input's ack subject, the input
    /// settled with it there. What it did not take, to publish.
    fn keep_here<'m>(&self, next: &str, group: Vec<Handoff<'m>>) -> Vec<Handoff<'m>> {
        if !self.locals.hosts(next) {
            return group;
        }
        // A claim check is read, and deleted, by the stage that settles its message.
        let (here, rest): (Vec<_>, Vec<_>) = group
            .into_iter()
            .partition(|h| h.claim.is_none() && payloads::claim(h.msg.headers.as_ref()).is_none());
        if here.is_empty() {
            return rest;
        }
        let letters = here.iter().map(Handoff::letter).collect();
        if !self.locals.offer(next, letters).is_empty() {
            // It stopped pulling: through the stream, all of them.
            let mut all = here;
            all.extend(rest);
            return all;
        }
        self.metrics.handed_on_here.inc_by(here.len() as u64);
        rest
    }

    /// Gives back work this agent will not start soon, so an idle agent takes it now:
    /// `msgs` go to their stage's stream again (one envelope per subject where several
    /// fit), and each is acked here once JetStream holds its copy. Each copy is the work
    /// as it came, without the `Nats-Msg-Id` that would make JetStream drop it as the
    /// original's duplicate. Ack only, never [`Outbox::settle`]: the copy still reads the
    /// object a claim-checked body went to. One that cannot be published again is given
    /// back the ordinary way (`Nak`), which gives back its whole envelope.
    pub async fn hand_back(&self, msgs: &[jetstream::Message]) {
        let copies: Vec<Handoff<'_>> = msgs
            .iter()
            .map(|msg| Handoff {
                msg,
                next: msg.subject.to_string(),
                headers: without_msg_id(msg.headers.as_ref()),
                body: msg.payload.clone(),
                sizes: String::new(),
                claim: None,
            })
            .collect();
        let mut by_subject: BTreeMap<String, Vec<Handoff<'_>>> = BTreeMap::new();
        for copy in copies {
            by_subject.entry(copy.next.clone()).or_default().push(copy);
        }
        let mut sent = Vec::new();
        for (subject, group) in by_subject {
            for chunk in self.fitting(group) {
                match self.publish_chunk(&subject, &chunk).await {
                    Ok(ack) => sent.push((chunk, ack)),
                    Err(_) => self.give_back(&chunk).await,
                }
            }
        }
        for (chunk, pub_ack) in sent {
            match pub_ack.await {
                Ok(_) => {
                    for copy in &chunk {
                        self.ack(copy.msg, AckKind::Ack).await;
                    }
                }
                Err(_) => self.give_back(&chunk).await,
            }
        }
    }

    async fn give_back(&self, chunk: &[Handoff<'_>]) {
        for copy in chunk {
            self.ack(copy.msg, AckKind::Nak(None)).await;
        }
    }

    /// Publishes `chunk` to `subject`: a message of its own when it is one, else one
    /// envelope.
    async fn publish_chunk(
        &self,
        subject: &str,
        chunk: &[Handoff<'_>],
    ) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
        if let [one] = chunk {
            return self
                .js
                .publish_with_headers(subject.to_owned(), one.headers.clone(), one.body.clone())
                .await;
        }
        let letters: Vec<Letter> = chunk
            .iter()
            .map(|h| Letter::new(&h.headers, h.body.clone()))
            .collect();
        let body = envelope::encode(&letters).expect("a chunk holds 2 to 255 letters");
        let mut h = HeaderMap::new();
        h.insert(headers::ENVELOPE, letters.len().to_string());
        self.js
            .publish_with_headers(subject.to_owned(), h, body)
            .await
    }

    /// `group` cut into envelopes that each fit one NATS message (and hold at most 255
    /// letters); a hand-off is never split.
    fn fitting<'m>(&self, group: Vec<Handoff<'m>>) -> Vec<Vec<Handoff<'m>>> {
        let mut chunks: Vec<Vec<Handoff<'m>>> = Vec::new();
        let mut size = 2;
        for handoff in group {
            let adds = envelope::letter_size(&handoff.headers, handoff.body.len());
            let full = chunks.last().is_none_or(|c| {
                c.len() >= 255 || !payloads::fits_inline(&self.client, size + adds)
            });
            if full {
                chunks.push(Vec::new());
                size = 2;
            }
            size += adds;
            chunks.last_mut().expect("pushed").push(handoff);
        }
        chunks
    }
}

/// `headers` less `Nats-Msg-Id`.
fn without_msg_id(headers: Option<&HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        if AsRef::<str>::as_ref(name) != headers::MSG_ID {
            for value in values {
                out.append(name.clone(), value.clone());
            }
        }
    }
    out
}
