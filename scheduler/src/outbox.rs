//! Where a result goes, and the ack that follows it: the next stage's work stream
//! (JetStream, de-duplicated), or, once the request is finished, its record in the results
//! bucket (an asynchronous job's `X-Result-Key`) and the requester's reply subject (core
//! NATS). Every reply, hand-off and ack of a stage goes through its [`Outbox`], so "acked
//! only once its result is safe" is kept in one place.
//!
//! Claim checks ([`natserve_protocol::payloads`]) meet here too: a result over one NATS
//! message is stored before it goes out, a result that cannot go out is answered
//! `server_error` at once (never left to the requester's deadline), and an input that
//! came as a claim check has its object deleted once the input is settled (acked or
//! terminated; a `Nak` keeps it for the redelivery).

mod handoffs;
mod replies;
mod results;

use handoffs::Handoff;
use replies::Answer;

use std::sync::Arc;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use natserve_protocol::payloads::{self, Hop, PayloadError, Payloads};
use natserve_protocol::streams::MAX_DELIVER;
use natserve_protocol::{headers, ItemResult, Names, Outcome, Rejection, Results};
use tracing::warn;

use crate::envelopes::Envelopes;
use crate::local::LocalStages;
use crate::places::Places;
use crate::StageMetrics;

/// The body of the error reply to a message that cannot be handed on without an id.
pub const MISSING_REQUEST_ID: &str =
    "work message has no X-Request-Id header: it is needed to hand the request to the next stage";

/// One stage's way out.
pub struct Outbox {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Where each item goes next, by the place it came from ([`Places`]).
    places: Places,
    /// The stage's home, for its log lines.
    route: String,
    stage: u32,
    /// Media type of a successful reply.
    mime: String,
    /// Which reply subjects are trusted ([`Names::is_reply_subject`]).
    names: Names,
    /// Where asynchronous jobs' outcomes are written.
    results: Results,
    metrics: StageMetrics,
    payloads: Payloads,
    /// Work that came as envelopes: a letter's ack waits for its batch-mates in it.
    envelopes: Arc<Envelopes>,
    /// The agent's stages, which take hand-offs to them without the stream.
    locals: Arc<LocalStages>,
}

impl Outbox {
    /// The way out of stage `spec`, which serves `places` on the agent whose stages are
    /// `locals`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: async_nats::Client,
        places: Places,
        spec: &natserve_protocol::StageSpec,
        names: Names,
        results: Results,
        metrics: StageMetrics,
        replicas: usize,
        locals: Arc<LocalStages>,
    ) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            envelopes: Arc::new(Envelopes::sharing(locals.open_envelopes())),
            locals,
            payloads: Payloads::new(js.clone(), &names).with_replicas(replicas),
            js,
            client,
            places,
            route: spec.route.clone(),
            stage: spec.stage,
            mime: spec.mime.clone(),
            names,
            results,
            metrics,
        }
    }

    /// Whether the message names a reply subject an agent must not publish to (see
    /// [`Names::is_reply_subject`]). A message without one was submitted
    /// fire-and-forget and is fine.
    pub fn untrusted_reply(&self, msg: &jetstream::Message) -> bool {
        header(msg, headers::REPLY_TO).is_some_and(|to| !self.names.is_reply_subject(to))
    }

    /// Terminates a message whose reply subject is not trusted, unanswered and unrun.
    pub async fn refuse_reply_subject(&self, msg: &jetstream::Message) {
        warn!(
            route = %self.route,
            stage = self.stage,
            request_id = header(msg, headers::REQUEST_ID).unwrap_or(""),
            trace_id = headers::trace_id_of(msg.headers.as_ref()),
            reply_to = header(msg, headers::REPLY_TO).unwrap_or(""),
            "refusing work whose reply subject is not under <namespace>.reply.; terminated unanswered"
        );
        self.settle(msg, AckKind::Term).await;
    }

    /// Gives a message whose worker died while running it another delivery (`Nak`: at
    /// once, to any agent). Its next delivery runs alone, so should it be what killed the
    /// worker, it takes no batch-mates down the second time (see `crate::pull`).
    pub async fn retry(&self, msg: &jetstream::Message) {
        self.ack(msg, AckKind::Nak(None)).await;
    }

    /// Whether `msg`'s successful result goes to another stage rather than to the
    /// requester.
    pub fn hands_off(&self, msg: &jetstream::Message) -> bool {
        self.places.of(&msg.subject).next_subject.is_some()
    }

    /// The envelopes of work this stage has open: its pull inboxes open them, and its
    /// acks close them.
    pub fn envelopes(&self) -> Arc<Envelopes> {
        self.envelopes.clone()
    }

    /// Where the stage's items come from and go.
    pub fn places(&self) -> &Places {
        &self.places
    }

    /// Waits while the stage after this one, where this agent hosts it, has more
    /// waiting than it starts soon ([`LocalStages::wait_for_room`]).
    pub async fn wait_for_next(&self, cancel: &tokio_util::sync::CancellationToken) {
        if let Some(next) = &self.places.home().next_subject {
            self.locals.wait_for_room(next, cancel).await;
        }
    }

    /// How many more letters the stage after this one takes soon, where this agent hosts
    /// it ([`LocalStages::room`]): a bound on what this stage pulls ahead.
    pub fn next_room(&self) -> Option<usize> {
        let next = self.places.home().next_subject.as_ref()?;
        self.locals.room(next)
    }

    /// Sends every result where it belongs, then acks each input once its result is safe:
    /// a hand-off only after JetStream acknowledged it.
    /// `events[i]` is how many stream events item `i` sent (the last stage of a streaming
    /// route); its reply says so, ending the stream.
    pub async fn hand_on(
        &self,
        msgs: &[jetstream::Message],
        results: Vec<ItemResult>,
        events: &[u32],
    ) {
        let size = msgs.len();
        let mut handoffs = Vec::new();
        // The batch's answers go together: their replies in an envelope per requester
        // that reads them, and then, each on its own, a durable record and the ack, so
        // one whose record waits for its bucket (a cluster electing a leader) holds back
        // no batch-mate.
        let mut answered = Vec::new();
        for (i, (msg, result)) in msgs.iter().zip(results).enumerate() {
            let sizes = append_batch_size(header(msg, headers::BATCH_SIZES), size);
            let way = self.places.of(&msg.subject);
            let next = match (&way.next_subject, Outcome::from(result.status)) {
                (Some(next), Outcome::Ok) => next,
                (_, outcome) => {
                    self.metrics.count_item(outcome);
                    let sent = events.get(i).copied().unwrap_or(0);
                    answered.push(Answer {
                        msg,
                        outcome,
                        body: result.body,
                        sizes,
                        events: sent,
                    });
                    continue;
                }
            };
            let next_stage = way.at.stage + 1;
            let Some(mut h) = handoff_headers(msg.headers.as_ref(), next_stage, &sizes) else {
                let body = Bytes::from_static(MISSING_REQUEST_ID.as_bytes());
                self.finish(msg, Outcome::ClientError, body, Some(&sizes))
                    .await;
                continue;
            };
            let mut body = result.body;
            let mut claim = None;
            if !payloads::fits_inline(&self.client, body.len()) {
                match self.check_in(msg, Hop::Stage(next_stage), &body).await {
                    Ok(name) => {
                        h.insert(headers::PAYLOAD_OBJECT, name.as_str());
                        body = Bytes::new();
                        claim = Some(name);
                    }
                    Err(e) => {
                        let text = format!("internal error: the result of stage {} of {} could not be handed to the next stage: {e}", way.at.stage, way.at.route);
                        self.finish(msg, Outcome::ServerError, text.into(), Some(&sizes))
                            .await;
                        continue;
                    }
                }
            }
            self.metrics.count_item(Outcome::Ok);
            handoffs.push(Handoff {
                msg,
                next: next.clone(),
                headers: h,
                body,
                sizes,
                claim,
            });
        }
        futures::join!(self.answer(answered), self.hand_off(handoffs));
    }

    /// Stores a body over one NATS message for `msg`'s request; the object's name.
    async fn check_in(
        &self,
        msg: &jetstream::Message,
        hop: Hop,
        body: &[u8],
    ) -> Result<String, PayloadError> {
        let request_id = header(msg, headers::REQUEST_ID).unwrap_or("anonymous");
        let name = payloads::object_name(request_id, hop);
        self.payloads.put(&name, body).await?;
        Ok(name)
    }

    /// Acks or terminates `msg`; its input object, if it came as a claim check, is
    /// deleted once the message is settled for good (`Ack`, `Term`), never on a `Nak`.
    async fn settle(&self, msg: &jetstream::Message, kind: AckKind) {
        self.ack(msg, kind).await;
        if matches!(kind, AckKind::Ack | AckKind::Term) {
            if let Some(name) = payloads::claim(msg.headers.as_ref()) {
                self.payloads.delete(name).await;
            }
        }
    }

    /// The bodies of the messages that came as claim checks, fetched from the payloads
    /// store into each message; a message whose body cannot be fetched is answered
    /// `server_error` and left out. Messages without a claim are returned as they are.
    pub async fn check_out(&self, msgs: Vec<jetstream::Message>) -> Vec<jetstream::Message> {
        let mut ready = Vec::with_capacity(msgs.len());
        for mut msg in msgs {
            let Some(name) = payloads::claim(msg.headers.as_ref()).map(str::to_owned) else {
                ready.push(msg);
                continue;
            };
            match self.payloads.fetch(&name).await {
                Ok(body) => {
                    msg.message.payload = body;
                    ready.push(msg);
                }
                Err(e) => {
                    warn!(route = %self.route, stage = self.stage, request_id = header(&msg, headers::REQUEST_ID).unwrap_or(""), trace_id = headers::trace_id_of(msg.headers.as_ref()), error = %e, "cannot fetch a work payload");
                    let text = format!(
                        "internal error: the input of stage {} of {} could not be read: {e}",
                        self.stage, self.route
                    );
                    self.finish(&msg, Outcome::ServerError, text.into(), None)
                        .await;
                }
            }
        }
        ready
    }

    async fn fail_handoff(
        &self,
        msg: &jetstream::Message,
        err: &jetstream::context::PublishError,
        sizes: &str,
        claim: Option<String>,
    ) {
        if let Some(name) = claim {
            self.payloads.delete(&name).await;
        }
        let rejection = Rejection::from_publish_error(err);
        let (outcome, text) = handoff_failure(rejection);
        warn!(route = %self.route, stage = self.stage, request_id = header(msg, headers::REQUEST_ID).unwrap_or(""), trace_id = headers::trace_id_of(msg.headers.as_ref()), ?rejection, error = %err, "hand-off failed");
        self.finish(
            msg,
            outcome,
            Bytes::from_static(text.as_bytes()),
            Some(sizes),
        )
        .await;
    }

    /// Answers a request that will not go further and terminates its message.
    pub async fn finish(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: Bytes,
        sizes: Option<&str>,
    ) {
        self.metrics.count_item(outcome);
        self.reply(msg, outcome, body, sizes, 0).await;
        self.settle(msg, AckKind::Term).await;
    }

    /// [`Outbox::finish`] for a request whose stream already carried `events` events.
    pub async fn finish_stream(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        body: Bytes,
        events: u32,
    ) {
        self.metrics.count_item(outcome);
        self.reply(msg, outcome, body, None, events).await;
        self.ack(msg, AckKind::Term).await;
    }

    /// Publishes event number `seq` (from 1) of a request's stream to its requester: core
    /// NATS, like the reply that will end the stream, so they arrive in order.
    pub async fn stream_event(&self, msg: &jetstream::Message, seq: u32, body: Bytes) {
        let Some(to) = self.trusted_reply_subject(msg) else {
            return;
        };
        let mut h = HeaderMap::new();
        h.insert(headers::EVENT_SEQ, seq.to_string());
        if let Some(id) = header(msg, headers::REQUEST_ID) {
            h.insert(headers::REQUEST_ID, id);
        }
        if let Err(e) = self
            .client
            .publish_with_headers(to.to_owned(), h, body)
            .await
        {
            warn!(subject = to, request_id = header(msg, headers::REQUEST_ID).unwrap_or(""), trace_id = headers::trace_id_of(msg.headers.as_ref()), error = %e, "stream event publish failed");
        }
    }

    /// The message's reply subject, if it has one this agent may publish to.
    fn trusted_reply_subject<'m>(&self, msg: &'m jetstream::Message) -> Option<&'m str> {
        let to = header(msg, headers::REPLY_TO)?;
        // Triage already refused such messages; this keeps every other path honest.
        if !self.names.is_reply_subject(to) {
            warn!(
                subject = to,
                "not replying to a subject outside <namespace>.reply."
            );
            return None;
        }
        Some(to)
    }

    /// Terminates a request nobody waits for any more, without an answer.
    pub async fn drop_unanswered(&self, msg: &jetstream::Message) {
        self.settle(msg, AckKind::Term).await;
    }

    /// Hands messages no worker here will run back to the queue: JetStream redelivers
    /// them at once (to this agent or another) instead of after the ack wait.
    pub async fn release(&self, msgs: &[jetstream::Message]) {
        for msg in msgs {
            self.ack(msg, AckKind::Nak(None)).await;
        }
    }

    /// Settles `msg` with JetStream: at once for a message of its own, with the last of
    /// its letters for one that came in an envelope ([`Envelopes::settle`]).
    async fn ack(&self, msg: &jetstream::Message, kind: AckKind) {
        let Some(kind) = self.envelopes.settle(msg, kind) else {
            return;
        };
        if let Err(e) = msg.ack_with(kind).await {
            warn!(error = %e, "ack failed; the message will be redelivered");
        }
    }

    /// Tells JetStream a long batch is still running, so it does not redeliver it.
    pub async fn progress(&self, msgs: &[jetstream::Message]) {
        for msg in msgs {
            let _ = msg.ack_with(AckKind::Progress).await;
        }
    }
}

/// How many times JetStream has delivered `msg` (1 the first time); 1 when unknown.
pub fn delivered(msg: &jetstream::Message) -> i64 {
    msg.info().map(|i| i.delivered).unwrap_or(1)
}

/// Whether this is the last delivery JetStream will make of `msg`: it is answered, not
/// run, since a loss now would leave it in the queue unanswered.
pub fn is_last_delivery(delivered: i64) -> bool {
    delivered >= MAX_DELIVER
}

/// A header of a received message, as text.
pub fn header<'a>(msg: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    headers::get(msg.headers.as_ref(), name)
}

/// `X-Batch-Sizes` after this stage ran the item in a batch of `size`.
pub fn append_batch_size(previous: Option<&str>, size: usize) -> String {
    match previous {
        Some(p) if !p.is_empty() => format!("{p},{size}"),
        _ => size.to_string(),
    }
}

/// Headers for handing an item to stage `next`: the request's own, with its
/// de-duplication id `<request id>.<next>` and the batch sizes so far. `None` without a
/// request id: any fixed stand-in would make JetStream drop every such request after the
/// first as a duplicate, and ack its input, so it would silently never run.
pub fn handoff_headers(
    received: Option<&HeaderMap>,
    next: u32,
    batch_sizes: &str,
) -> Option<HeaderMap> {
    let id = headers::get(received, headers::REQUEST_ID).filter(|id| !id.is_empty())?;
    let msg_id = format!("{id}.{next}");
    let mut h = match received {
        // The input's claim check is this stage's, not the next one's.
        Some(r) if payloads::claim(Some(r)).is_some() => without(r, headers::PAYLOAD_OBJECT),
        _ => received.cloned().unwrap_or_default(),
    };
    h.insert(headers::MSG_ID, msg_id.as_str());
    h.insert(headers::BATCH_SIZES, batch_sizes);
    Some(h)
}

/// `headers` less every value of `name`.
fn without(headers: &HeaderMap, name: &str) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (key, values) in headers.iter() {
        if AsRef::<str>::as_ref(key) != name {
            for value in values {
                kept.append(key.clone(), value.clone());
            }
        }
    }
    kept
}

/// The outcome a refused hand-off means for the request, and the body that says why.
pub fn handoff_failure(rejection: Rejection) -> (Outcome, &'static str) {
    match rejection {
        Rejection::QueueFull => (Outcome::Overloaded, "next stage's queue is full"),
        Rejection::NoStream => (Outcome::Unavailable, "next stage is not served"),
        Rejection::Unreachable => (
            Outcome::Unavailable,
            "could not hand the request to the next stage",
        ),
        Rejection::TooLarge => (
            Outcome::ServerError,
            "intermediate result exceeds the NATS max_payload",
        ),
        Rejection::Other => (
            Outcome::ServerError,
            "could not hand the request to the next stage",
        ),
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

    #[test]
    fn a_handoff_is_deduplicated_by_request_id_and_stage() {
        let mut received = HeaderMap::new();
        received.insert(headers::REQUEST_ID, "r1");
        received.insert(headers::DEADLINE, "123");
        let h = handoff_headers(Some(&received), 2, "4,1").unwrap();
        assert_eq!(headers::get(Some(&h), headers::MSG_ID), Some("r1.2"));
        assert_eq!(headers::get(Some(&h), headers::BATCH_SIZES), Some("4,1"));
        assert_eq!(headers::get(Some(&h), headers::DEADLINE), Some("123"));
        assert_eq!(payloads::claim(Some(&h)), None);
    }

    #[test]
    fn a_handoff_does_not_pass_on_its_input_claim_check() {
        let mut received = HeaderMap::new();
        received.insert(headers::REQUEST_ID, "r1");
        received.insert(headers::TRACEPARENT, "00-ab-cd-01");
        received.insert(headers::PAYLOAD_OBJECT, "r1.1.0123456789ab");
        let h = handoff_headers(Some(&received), 2, "1,1").unwrap();
        assert_eq!(payloads::claim(Some(&h)), None);
        assert_eq!(
            headers::get(Some(&h), headers::TRACEPARENT),
            Some("00-ab-cd-01")
        );
        assert_eq!(headers::get(Some(&h), headers::MSG_ID), Some("r1.2"));
    }

    #[test]
    fn a_handoff_without_request_id_is_refused_not_given_a_shared_id() {
        assert!(handoff_headers(None, 1, "1").is_none());
        let mut no_id = HeaderMap::new();
        no_id.insert(headers::DEADLINE, "123");
        assert!(handoff_headers(Some(&no_id), 1, "1").is_none());
        no_id.insert(headers::REQUEST_ID, "");
        assert!(handoff_headers(Some(&no_id), 1, "1").is_none());
    }

    #[test]
    fn refused_handoffs_keep_their_outcomes() {
        assert_eq!(handoff_failure(Rejection::QueueFull).0, Outcome::Overloaded);
        assert_eq!(handoff_failure(Rejection::NoStream).0, Outcome::Unavailable);
        assert_eq!(
            handoff_failure(Rejection::Unreachable).0,
            Outcome::Unavailable
        );
        assert_eq!(handoff_failure(Rejection::TooLarge).0, Outcome::ServerError);
        assert_eq!(handoff_failure(Rejection::Other).0, Outcome::ServerError);
    }
}
