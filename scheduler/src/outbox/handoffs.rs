//! Hand-offs: a batch's results for the next stage of their routes, published to its
//! work stream. Those for one next stage go as one envelope
//! ([`natserve_protocol::envelope`]): one JetStream message and one ack for the batch
//! instead of one per item. A result alone goes as a message of its own, with its
//! `Nats-Msg-Id`, so JetStream drops the copy a rerun would hand on; letters of an
//! envelope have none, and a rerun's copies run again at the next stage and are
//! answered once (the first reply wins).

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

impl Outbox {
    /// Publishes `handoffs`, grouped by next stage, and acks each input once JetStream
    /// acked its hand-off; one that cannot be handed on is answered now.
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
            for chunk in self.fitting(group) {
                let publish = if let [one] = chunk.as_slice() {
                    self.js
                        .publish_with_headers(next.clone(), one.headers.clone(), one.body.clone())
                        .await
                } else {
                    let letters: Vec<Letter> = chunk
                        .iter()
                        .map(|h| Letter::new(&h.headers, h.body.clone()))
                        .collect();
                    let body = envelope::encode(&letters).expect("a chunk holds 2 to 255 letters");
                    let mut h = HeaderMap::new();
                    h.insert(headers::ENVELOPE, letters.len().to_string());
                    self.js.publish_with_headers(next.clone(), h, body).await
                };
                match publish {
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
