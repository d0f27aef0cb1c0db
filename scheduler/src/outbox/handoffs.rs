//! Hand-offs: a batch's results for the next stage of their routes, published to its
//! work stream through the stage's [`natserve_protocol::postbox::Postbox`] (group commit): those for one next stage
//! go as one envelope ([`natserve_protocol::envelope`]) with whatever else waits for it
//! while a publish there is in flight, one JetStream message and one ack for them all
//! instead of one per item, so an unbatched stage's results travel together under load
//! as a batched one's do. A result alone goes as a message of its own, with its
//! `Nats-Msg-Id`, so JetStream drops the copy a rerun would hand on; letters of an
//! envelope have none, and a rerun's copies run again at the next stage and are
//! answered once (the first reply wins).
//!
//! Hand-backs: work an agent pulled but will not start soon goes to its own stage's
//! stream again ([`Outbox::hand_back`]), the same way.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use natserve_protocol::headers;
use natserve_protocol::postbox::{Landed, Refusal};

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
        for (h, landed) in self.publish_by_subject(handoffs).await {
            match landed {
                Ok(landed) => {
                    // A rerun's hand-off that JetStream de-duplicated: the object the
                    // first run handed on is the one the next stage reads.
                    if let (true, Some(name)) = (landed.duplicate, &h.claim) {
                        self.payloads.delete(name).await;
                    }
                    self.settle(h.msg, AckKind::Ack).await;
                }
                Err(refusal) => self.fail_handoff(h.msg, &refusal, &h.sizes, h.claim).await,
            }
        }
    }

    /// Gives back work this agent will not start soon, so an idle agent takes it now:
    /// `msgs` go to their stage's stream again (together where they fit), and each is
    /// acked here once JetStream holds its copy. Each copy is the work as it came,
    /// without the `Nats-Msg-Id` that would make JetStream drop it as the original's
    /// duplicate. Ack only, never [`Outbox::settle`]: the copy still reads the object a
    /// claim-checked body went to. One that cannot be published again is given back the
    /// ordinary way (`Nak`), which gives back its whole envelope.
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
        for (copy, landed) in self.publish_by_subject(copies).await {
            let kind = match landed {
                Ok(_) => AckKind::Ack,
                Err(_) => AckKind::Nak(None),
            };
            self.ack(copy.msg, kind).await;
        }
    }

    /// Publishes `items` through the postbox, all those for one subject at once; each
    /// item with how its publish landed.
    async fn publish_by_subject<'m>(
        &self,
        items: Vec<Handoff<'m>>,
    ) -> Vec<(Handoff<'m>, Result<Landed, Refusal>)> {
        let mut by_subject: BTreeMap<String, Vec<Handoff<'m>>> = BTreeMap::new();
        for item in items {
            by_subject.entry(item.next.clone()).or_default().push(item);
        }
        let groups = by_subject.into_iter().map(|(subject, group)| async move {
            let work = group
                .iter()
                .map(|h| (h.headers.clone(), h.body.clone()))
                .collect();
            let landed = self.postbox.publish_all(&subject, work).await;
            group.into_iter().zip(landed).collect::<Vec<_>>()
        });
        futures::future::join_all(groups)
            .await
            .into_iter()
            .flatten()
            .collect()
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
