//! Work that came as an envelope ([`natserve_protocol::envelope`]): an ingress that had
//! several requests for one stage at the same moment sent them as one JetStream message.
//!
//! Each letter runs as a message of its own: [`Envelopes::open`] makes one
//! `jetstream::Message` per letter, with the letter's headers and body and the
//! envelope's subject and ack subject, so everything downstream (triage, batching,
//! replies, hand-offs, the delivery count) reads it as it reads any work message. Only
//! the ack differs: JetStream knows one message, so the envelope is acked once its last
//! letter is settled ([`Envelopes::settle`]). A letter given back (`Nak`: its worker died,
//! the agent is stopping) gives the whole envelope back: every letter is delivered again,
//! and one already answered is answered again, which its requester drops (it takes the
//! first reply; a recorded reply or result is written once). `Progress` acks pass
//! through: any held letter keeps the whole envelope alive.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use async_nats::jetstream::{self, AckKind};
use natserve_protocol::envelope::{self, EnvelopeError};
use natserve_protocol::headers;

/// How the letters of one open envelope were settled so far.
#[derive(Debug)]
struct Open {
    left: usize,
    given_back: bool,
    all_terminated: bool,
}

/// Envelopes whose letters are not all settled, by ack subject. One agent's stages share
/// it: a letter handed to the next stage on the same agent ([`crate::local`]) carries its
/// input's ack subject there, and is settled there.
#[derive(Debug, Default)]
pub struct OpenEnvelopes(Mutex<HashMap<String, Open>>);

/// The envelopes of one stage whose letters are not all settled (in the map its agent's
/// stages share), and the letters ready to run here: pulled beyond a batch, or handed on
/// by the stage before on this agent. The stage's next free worker takes them first (any
/// of its pull loops: one envelope's letters spread over the agent's workers).
#[derive(Debug, Default)]
pub struct Envelopes {
    open: Arc<OpenEnvelopes>,
    waiting: Mutex<VecDeque<jetstream::Message>>,
    /// Set once the stage stops pulling: letters offered from another stage then go to
    /// the stream instead ([`Envelopes::offer`]).
    closed: AtomicBool,
    /// Told when letters start waiting, so a pull loop idling on the server looks.
    spilled: Notify,
    /// Told when waiting letters are taken, so the stage before on this agent, which
    /// pulls only while few wait here ([`crate::local`]), looks again.
    taken: Notify,
    /// Letters per work message of the stage, in 256ths, averaged over arrivals (0
    /// while none arrived): what sizes a pull request ([`Envelopes::messages_for`]).
    per_message: AtomicUsize,
}

/// Fixed-point scale of [`Envelopes::per_message`].
const SCALE: usize = 256;

/// Whether `msg` carries an envelope of work.
pub fn is_envelope(msg: &async_nats::Message) -> bool {
    headers::get(msg.headers.as_ref(), headers::ENVELOPE).is_some()
}

impl Envelopes {
    /// A stage's envelopes, open ones kept in `open` (its agent's, shared by its stages).
    pub fn sharing(open: Arc<OpenEnvelopes>) -> Self {
        Self {
            open,
            ..Self::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Open>> {
        self.open.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One message per letter of the envelope `msg`, each to be settled through
    /// [`Envelopes::settle`].
    pub fn open(
        &self,
        msg: async_nats::Message,
        context: &jetstream::Context,
    ) -> Result<Vec<jetstream::Message>, EnvelopeError> {
        let letters = envelope::decode(&msg.payload)?;
        let mut out = Vec::with_capacity(letters.len());
        for letter in letters {
            out.push(jetstream::Message {
                message: async_nats::Message {
                    subject: msg.subject.clone(),
                    reply: msg.reply.clone(),
                    length: letter.body.len(),
                    headers: Some(letter.header_map()?),
                    payload: letter.body,
                    status: None,
                    description: None,
                },
                context: context.clone(),
            });
        }
        if let Some(ack) = &msg.reply {
            self.lock().insert(
                ack.to_string(),
                Open {
                    left: out.len(),
                    given_back: false,
                    all_terminated: true,
                },
            );
        }
        Ok(out)
    }

    /// What to send JetStream now that `msg` is settled with `kind`: `kind` itself for a
    /// message of its own (and for `Progress`), nothing while other letters of its
    /// envelope are out, and the envelope's ack once the last is settled: `Nak` if any
    /// letter was given back, `Term` if all were terminated, else `Ack`.
    pub fn settle(&self, msg: &jetstream::Message, kind: AckKind) -> Option<AckKind> {
        if matches!(kind, AckKind::Progress) {
            return Some(kind);
        }
        let Some(ack) = msg.reply.as_ref() else {
            return Some(kind);
        };
        let mut open = self.lock();
        let Some(envelope) = open.get_mut(ack.as_str()) else {
            return Some(kind);
        };
        envelope.left = envelope.left.saturating_sub(1);
        envelope.given_back |= matches!(kind, AckKind::Nak(_));
        envelope.all_terminated &= matches!(kind, AckKind::Term);
        if envelope.left > 0 {
            return None;
        }
        let done = open.remove(ack.as_str()).expect("present");
        Some(if done.given_back {
            AckKind::Nak(None)
        } else if done.all_terminated {
            AckKind::Term
        } else {
            AckKind::Ack
        })
    }

    /// Envelopes with letters still out.
    pub fn open_count(&self) -> usize {
        self.lock().len()
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<jetstream::Message>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leaves `letters` for the stage's next free worker.
    pub fn spill(&self, letters: impl IntoIterator<Item = jetstream::Message>) {
        self.waiting().extend(letters);
        self.spilled.notify_waiters();
    }

    /// Leaves `letters` from another stage of this agent for the stage's next free
    /// worker, unless the stage stopped pulling: then they come back, to be published.
    pub fn offer(&self, letters: Vec<jetstream::Message>) -> Vec<jetstream::Message> {
        let mut waiting = self.waiting();
        if self.closed.load(Ordering::Relaxed) {
            return letters;
        }
        waiting.extend(letters);
        drop(waiting);
        self.spilled.notify_waiters();
        Vec::new()
    }

    /// Refuses every later [`Envelopes::offer`], and takes what waits (the stage stops
    /// pulling, so nothing here would run).
    pub fn close(&self) -> Vec<jetstream::Message> {
        let mut waiting = self.waiting();
        self.closed.store(true, Ordering::Relaxed);
        let all = waiting.drain(..).collect();
        drop(waiting);
        self.taken.notify_waiters();
        all
    }

    /// Whether the stage stopped pulling ([`Envelopes::close`]).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Up to `max` waiting letters, oldest first.
    pub fn take(&self, max: usize) -> Vec<jetstream::Message> {
        let mut waiting = self.waiting();
        let n = max.min(waiting.len());
        let out: Vec<jetstream::Message> = waiting.drain(..n).collect();
        drop(waiting);
        if !out.is_empty() {
            self.taken.notify_waiters();
        }
        out
    }

    /// Resolves when waiting letters are taken after it was enabled (or first polled).
    pub fn taken(&self) -> tokio::sync::futures::Notified<'_> {
        self.taken.notified()
    }

    /// Up to `most` of the newest waiting letters beyond the oldest `keep`, taken out to
    /// go back to the stage's stream ([`crate::outbox::Outbox::hand_back`]); those
    /// `stays` names stay, in their order: a letter delivered before, since a copy would
    /// start its delivery count again and it may be what killed a worker (it must run
    /// alone, and be answered if it does so twice), and one the stage before handed on
    /// here ([`crate::local`]), which never went through this stream.
    pub fn take_beyond(
        &self,
        keep: usize,
        most: usize,
        stays: impl Fn(&jetstream::Message) -> bool,
    ) -> Vec<jetstream::Message> {
        let mut waiting = self.waiting();
        let mut out = Vec::new();
        let mut at = waiting.len();
        while at > keep && out.len() < most {
            at -= 1;
            if !stays(&waiting[at]) {
                out.push(waiting.remove(at).expect("in range"));
            }
        }
        drop(waiting);
        if !out.is_empty() {
            self.taken.notify_waiters();
        }
        out.reverse();
        out
    }

    /// How many waiting letters `counts` counts.
    pub fn waiting_where(&self, counts: impl Fn(&jetstream::Message) -> bool) -> usize {
        self.waiting().iter().filter(|m| counts(m)).count()
    }

    /// Counts one work message of the stage that carried `letters` (1 for a plain
    /// message). The average moves an eighth of the way to each arrival; a race between
    /// two inboxes loses a sample, harmlessly.
    pub fn observe_message(&self, letters: usize) {
        let new = letters.max(1) * SCALE;
        let old = self.per_message.load(Ordering::Relaxed);
        let next = if old == 0 {
            new
        } else {
            old - old / 8 + new / 8
        };
        self.per_message.store(next.max(SCALE), Ordering::Relaxed);
    }

    /// How many work messages a pull asks for to bring `letters` letters, when the
    /// stage has room for `room` more beyond them (letters its other workers or its next
    /// rounds would start soon, [`crate::pull`]): as many as `letters` while messages
    /// carry one letter each, fewer when they come as envelopes of several, and at least
    /// one. Rounded up where the room takes an average envelope's excess, down where it
    /// does not (a stage whose batches are long next to a pull keeps nothing beyond its
    /// batch: one more round trip to finish the batch costs it less than an excess that
    /// waits a whole batch there, or goes back). A pull sized in letters would bring up
    /// to that many envelopes, and one that had its batch from the first envelope would
    /// stay open at the server, taking the next envelopes too.
    ///
    /// While nothing has arrived yet, one: its answer says which it is.
    pub fn messages_for(&self, letters: usize, room: usize) -> usize {
        let per = self.per_message.load(Ordering::Relaxed);
        if per == 0 {
            return 1;
        }
        let up = (letters * SCALE).div_ceil(per);
        let within = (letters + room) * SCALE / per;
        up.min(within).clamp(1, letters.max(1))
    }

    /// About how many letters `messages` work messages of the stage carry.
    pub fn letters_in(&self, messages: usize) -> usize {
        messages * self.per_message.load(Ordering::Relaxed).max(SCALE) / SCALE
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting().len()
    }

    pub fn has_waiting(&self) -> bool {
        !self.waiting().is_empty()
    }

    /// Resolves when letters are spilled after it was enabled (or first polled).
    pub fn spilled(&self) -> tokio::sync::futures::Notified<'_> {
        self.spilled.notified()
    }

    /// A `Progress` ack for each message whose letters wait to run: waiting for a free
    /// worker costs them no redelivery.
    pub async fn keep_waiting_alive(&self) {
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<jetstream::Message> = self
            .waiting()
            .iter()
            .filter(|m| seen.insert(m.reply.as_ref().map(|r| r.to_string())))
            .cloned()
            .collect();
        for msg in firsts {
            let _ = msg.ack_with(AckKind::Progress).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;
    use bytes::Bytes;
    use natserve_protocol::envelope::{encode, Letter};

    fn envelope_message(ack: &str, ids: &[&str]) -> async_nats::Message {
        let letters: Vec<Letter> = ids
            .iter()
            .map(|id| Letter {
                headers: vec![(headers::REQUEST_ID.into(), (*id).into())],
                body: Bytes::from(format!("body of {id}")),
            })
            .collect();
        let mut h = HeaderMap::new();
        h.insert(headers::ENVELOPE, ids.len().to_string());
        async_nats::Message {
            subject: "ns.work.echo.0".into(),
            reply: Some(ack.into()),
            payload: encode(&letters).unwrap(),
            headers: Some(h),
            status: None,
            description: None,
            length: 0,
        }
    }

    async fn context() -> jetstream::Context {
        // A client that never connects: the context is only carried, never used here.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        jetstream::new(client)
    }

    #[test]
    fn pulls_are_sized_in_letters_as_the_stage_receives_them() {
        let envelopes = Envelopes::default();
        // Nothing arrived yet: one, to learn from; then plain messages, one per letter.
        assert_eq!(envelopes.messages_for(8, 0), 1);
        envelopes.observe_message(1);
        assert_eq!(envelopes.messages_for(8, 0), 8);
        // Envelopes of four: two messages bring a batch of eight.
        for _ in 0..64 {
            envelopes.observe_message(4);
        }
        assert_eq!(envelopes.messages_for(8, 0), 2);
        assert_eq!(envelopes.messages_for(3, 8), 1);
        // Envelopes of three: three bring nine, one more than a batch of eight. With no
        // room beyond the batch, two (six), and the batch is finished by another pull.
        for _ in 0..64 {
            envelopes.observe_message(3);
        }
        assert_eq!(envelopes.messages_for(8, 8), 3);
        assert_eq!(envelopes.messages_for(8, 0), 2);
        assert_eq!(envelopes.messages_for(2, 0), 1);
        // Never none, never more than a message per letter.
        assert_eq!(envelopes.messages_for(0, 0), 1);
        for _ in 0..64 {
            envelopes.observe_message(100);
        }
        assert_eq!(envelopes.messages_for(16, 64), 1);
        for _ in 0..64 {
            envelopes.observe_message(0);
        }
        assert_eq!(envelopes.messages_for(16, 64), 16);
    }

    #[tokio::test]
    async fn letters_run_as_messages_and_the_envelope_is_acked_once_all_are_settled() {
        let envelopes = Envelopes::default();
        let ctx = context().await;
        let msg = envelope_message("$JS.ACK.s.c.1.7.7.0.1", &["a", "b", "c"]);
        assert!(is_envelope(&msg));
        let letters = envelopes.open(msg, &ctx).unwrap();
        let ids: Vec<&str> = letters
            .iter()
            .map(|m| headers::get(m.headers.as_ref(), headers::REQUEST_ID).unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(letters[1].payload.as_ref(), b"body of b");
        assert_eq!(letters[2].subject.as_str(), "ns.work.echo.0");
        assert!(matches!(
            envelopes.settle(&letters[0], AckKind::Progress),
            Some(AckKind::Progress)
        ));
        assert!(envelopes.settle(&letters[0], AckKind::Ack).is_none());
        assert!(envelopes.settle(&letters[1], AckKind::Term).is_none());
        assert!(matches!(
            envelopes.settle(&letters[2], AckKind::Ack),
            Some(AckKind::Ack)
        ));
        assert_eq!(envelopes.open_count(), 0);
    }

    #[tokio::test]
    async fn one_letter_given_back_gives_the_envelope_back_and_all_terminated_terminate_it() {
        let envelopes = Envelopes::default();
        let ctx = context().await;
        let letters = envelopes
            .open(envelope_message("$JS.ACK.s.c.1.8.8.0.1", &["a", "b"]), &ctx)
            .unwrap();
        assert!(envelopes.settle(&letters[0], AckKind::Nak(None)).is_none());
        assert!(matches!(
            envelopes.settle(&letters[1], AckKind::Ack),
            Some(AckKind::Nak(None))
        ));
        let letters = envelopes
            .open(envelope_message("$JS.ACK.s.c.1.9.9.0.1", &["a", "b"]), &ctx)
            .unwrap();
        assert!(envelopes.settle(&letters[0], AckKind::Term).is_none());
        assert!(matches!(
            envelopes.settle(&letters[1], AckKind::Term),
            Some(AckKind::Term)
        ));
    }

    #[tokio::test]
    async fn a_message_of_its_own_is_settled_as_asked_and_a_bad_envelope_is_refused() {
        let envelopes = Envelopes::default();
        let ctx = context().await;
        let mut plain = envelope_message("$JS.ACK.s.c.1.10.10.0.1", &["a"]);
        plain.headers = None;
        assert!(!is_envelope(&plain));
        let plain = jetstream::Message {
            message: plain,
            context: ctx.clone(),
        };
        assert!(matches!(
            envelopes.settle(&plain, AckKind::Ack),
            Some(AckKind::Ack)
        ));
        let mut bad = envelope_message("$JS.ACK.s.c.1.11.11.0.1", &["a"]);
        bad.payload = Bytes::from_static(b"\x00");
        assert!(envelopes.open(bad, &ctx).is_err());
        assert_eq!(envelopes.open_count(), 0);
    }
}
