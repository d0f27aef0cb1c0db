//! Work publishes by group commit: while JetStream acks one publish to a stage, the
//! requests that arrive for it wait, and go together in the next one, as an envelope
//! ([`crate::envelope`]). With nothing in flight a request goes at once, as a message of
//! its own (with the headers it came with, its `Nats-Msg-Id` too): concurrency 1 pays no
//! added delay, and under load the broker sees one message (and one ack) per group
//! instead of one per request. The ingress publishes its requests' work through one, an
//! agent its hand-offs to next stages and its hand-backs.
//!
//! One task per work subject does the publishing; each request waits for its group's
//! ack. An envelope has no `Nats-Msg-Id`: a group is made once, so a retry after an
//! error is a new group, and a request that landed twice runs twice and is answered
//! once (the first reply wins).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use crate::envelope::{self, Letter};
use crate::{headers, payloads, Rejection};
use async_nats::jetstream::{self, context::PublishError};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

/// Most requests in one envelope. A stage's queue bound (`--max-queue`) counts messages,
/// so this is also how many requests one queued message may stand for.
pub const MAX_LETTERS: usize = 64;

/// Why a publish did not land: what JetStream's answer means, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rejection: Rejection,
    pub text: String,
}

impl Refusal {
    pub fn of(error: &PublishError) -> Self {
        Self {
            rejection: Rejection::from_publish_error(error),
            text: error.to_string(),
        }
    }
}

/// How a publish landed: `duplicate` when JetStream dropped it as a copy of one it has
/// (a message of its own whose `Nats-Msg-Id` it saw within its window; never an envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub duplicate: bool,
}

struct Post {
    headers: HeaderMap,
    body: Bytes,
    landed: oneshot::Sender<Result<Landed, Refusal>>,
}

impl Post {
    /// Bytes it adds to an envelope.
    fn size(&self) -> usize {
        envelope::letter_size(&self.headers, self.body.len())
    }
}

/// A process's way to its stages' work subjects.
#[derive(Debug)]
pub struct Postbox {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// Publishes a subject may have in flight before what comes waits for the next group.
    in_flight: usize,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Vec<Post>>>>,
}

fn stopped() -> Refusal {
    Refusal {
        rejection: Rejection::Unreachable,
        text: "the publisher of this stage stopped".to_owned(),
    }
}

impl Postbox {
    pub fn new(client: async_nats::Client, jetstream: jetstream::Context) -> Self {
        Self {
            client,
            jetstream,
            in_flight: 1,
            queues: Mutex::default(),
        }
    }

    /// Lets `n` publishes per subject be in flight at once: less waiting, smaller groups.
    pub fn with_in_flight(mut self, n: usize) -> Self {
        self.in_flight = n.max(1);
        self
    }

    /// Publishes one request's work to `subject` and waits until JetStream acked it, alone
    /// or with the others of its group.
    pub async fn publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Landed, Refusal> {
        let mut landed = self.publish_all(subject, vec![(headers, body)]).await;
        landed.pop().unwrap_or_else(|| Err(stopped()))
    }

    /// Publishes several requests' work to `subject` at once (they go in one group
    /// where they fit, with what else waits) and waits for each one's ack, in order.
    pub async fn publish_all(
        &self,
        subject: &str,
        work: Vec<(HeaderMap, Bytes)>,
    ) -> Vec<Result<Landed, Refusal>> {
        let (posts, acks): (Vec<Post>, Vec<_>) = work
            .into_iter()
            .map(|(headers, body)| {
                let (landed, ack) = oneshot::channel();
                let post = Post {
                    headers,
                    body,
                    landed,
                };
                (post, ack)
            })
            .unzip();
        // A failed send drops the posts, and with them their senders: each ack says so.
        let _ = self.queue(subject).send(posts);
        let mut out = Vec::with_capacity(acks.len());
        for ack in acks {
            out.push(ack.await.unwrap_or_else(|_| Err(stopped())));
        }
        out
    }

    fn queue(&self, subject: &str) -> mpsc::UnboundedSender<Vec<Post>> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = queues.get(subject).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publisher(
            subject.to_owned(),
            rx,
            self.client.clone(),
            self.jetstream.clone(),
            self.in_flight,
        ));
        queues.insert(subject.to_owned(), tx.clone());
        tx
    }
}

/// Publishes what comes for `subject`, a group at a time: what waited while `in_flight`
/// publishes were in flight, up to [`MAX_LETTERS`] and one NATS message.
async fn publisher(
    subject: String,
    mut rx: mpsc::UnboundedReceiver<Vec<Post>>,
    client: async_nats::Client,
    js: jetstream::Context,
    in_flight: usize,
) {
    let mut waiting: VecDeque<Post> = VecDeque::new();
    let mut sending = FuturesUnordered::new();
    let mut open = true;
    loop {
        while let Ok(posts) = rx.try_recv() {
            waiting.extend(posts);
        }
        while sending.len() < in_flight && !waiting.is_empty() {
            let mut group = take_group(&client, &mut waiting);
            let (js, subject) = (&js, &subject);
            sending.push(async move {
                let result = send(js, subject, &mut group).await;
                for post in group {
                    let _ = post.landed.send(result.clone());
                }
            });
        }
        if !open && sending.is_empty() && waiting.is_empty() {
            return;
        }
        tokio::select! {
            posts = rx.recv(), if open && sending.len() < in_flight => match posts {
                Some(posts) => waiting.extend(posts),
                None => open = false,
            },
            Some(()) = sending.next(), if !sending.is_empty() => {}
        }
    }
}

/// The next group from the front of `waiting` (not empty): one post at least, then what
/// fits [`MAX_LETTERS`] and one NATS message.
fn take_group(client: &async_nats::Client, waiting: &mut VecDeque<Post>) -> Vec<Post> {
    let first = waiting.pop_front().expect("not empty");
    let mut size = 2 + first.size();
    let mut group = vec![first];
    while group.len() < MAX_LETTERS {
        let Some(adds) = waiting.front().map(Post::size) else {
            break;
        };
        if !payloads::fits_inline(client, size + adds) {
            break;
        }
        size += adds;
        group.push(waiting.pop_front().expect("looked at"));
    }
    group
}

/// Longest one group waits for JetStream's ack before its requests hear it did not come
/// (they try again, as for any publish that timed out): a stream without a leader for
/// a moment holds the stage's next group no longer than this.
const ACK_WITHIN: Duration = Duration::from_secs(1);

/// One publish for `group`: its one request as it is, or all of them in an envelope.
async fn send(
    js: &jetstream::Context,
    subject: &str,
    group: &mut [Post],
) -> Result<Landed, Refusal> {
    let (headers, body) = if let [one] = group {
        (
            std::mem::take(&mut one.headers),
            std::mem::take(&mut one.body),
        )
    } else {
        let letters: Vec<Letter> = group
            .iter()
            .map(|p| Letter::new(&p.headers, p.body.clone()))
            .collect();
        let body = envelope::encode(&letters).map_err(|e| Refusal {
            rejection: Rejection::Other,
            text: e.to_string(),
        })?;
        let mut h = HeaderMap::new();
        h.insert(headers::ENVELOPE, letters.len().to_string());
        (h, body)
    };
    let ack = js
        .publish_with_headers(subject.to_owned(), headers, body)
        .await
        .map_err(|e| Refusal::of(&e))?;
    match tokio::time::timeout(ACK_WITHIN, ack).await {
        Ok(acked) => acked
            .map(|ack| Landed {
                duplicate: ack.duplicate,
            })
            .map_err(|e| Refusal::of(&e)),
        Err(_) => Err(Refusal {
            rejection: Rejection::Unreachable,
            text: "no publish ack within 1 s".to_owned(),
        }),
    }
}
