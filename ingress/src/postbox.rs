//! Work publishes by group commit: while JetStream acks one publish to a stage, the
//! requests that arrive for it wait, and go together in the next one, as an envelope
//! ([`natserve_protocol::envelope`]). With nothing in flight a request goes at once, as
//! a message of its own: concurrency 1 pays no added delay, and under load the broker
//! sees one message (and one ack) per group instead of one per request.
//!
//! One task per work subject does the publishing; each request waits for its group's
//! ack. An envelope has no `Nats-Msg-Id`: a group is made once, so a retry after an
//! error is a new group, and a request that landed twice runs twice and is answered
//! once (the first reply wins).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishError};
use async_nats::HeaderMap;
use bytes::Bytes;
use natserve_protocol::envelope::{self, Letter};
use natserve_protocol::{headers, payloads, Rejection};
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

struct Post {
    headers: HeaderMap,
    body: Bytes,
    landed: oneshot::Sender<Result<(), Refusal>>,
}

impl Post {
    /// Bytes it adds to an envelope.
    fn size(&self) -> usize {
        envelope::letter_size(&self.headers, self.body.len())
    }
}

/// The ingress's way to its stages' work subjects.
#[derive(Debug)]
pub struct Postbox {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Post>>>,
}

impl Postbox {
    pub fn new(client: async_nats::Client, jetstream: jetstream::Context) -> Self {
        Self {
            client,
            jetstream,
            queues: Mutex::default(),
        }
    }

    /// Publishes one request's work to `subject` and waits until JetStream acked it, alone
    /// or with the others of its group.
    pub async fn publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), Refusal> {
        let (landed, ack) = oneshot::channel();
        let post = Post {
            headers,
            body,
            landed,
        };
        self.queue(subject).send(post).map_err(|_| Refusal {
            rejection: Rejection::Unreachable,
            text: "the publisher of this stage stopped".to_owned(),
        })?;
        ack.await.unwrap_or_else(|_| {
            Err(Refusal {
                rejection: Rejection::Unreachable,
                text: "the publisher of this stage stopped".to_owned(),
            })
        })
    }

    fn queue(&self, subject: &str) -> mpsc::UnboundedSender<Post> {
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
        ));
        queues.insert(subject.to_owned(), tx.clone());
        tx
    }
}

/// Publishes what comes for `subject`, a group at a time: what waited while the last
/// publish was in flight, up to [`MAX_LETTERS`] and one NATS message.
async fn publisher(
    subject: String,
    mut rx: mpsc::UnboundedReceiver<Post>,
    client: async_nats::Client,
    js: jetstream::Context,
) {
    let mut carried: Option<Post> = None;
    loop {
        let first = match carried.take() {
            Some(post) => post,
            None => match rx.recv().await {
                Some(post) => post,
                None => return,
            },
        };
        let mut size = 2 + first.size();
        let mut group = vec![first];
        while group.len() < MAX_LETTERS {
            let Ok(post) = rx.try_recv() else { break };
            let adds = post.size();
            if !payloads::fits_inline(&client, size + adds) {
                carried = Some(post);
                break;
            }
            size += adds;
            group.push(post);
        }
        let result = send(&js, &subject, &mut group).await;
        for post in group {
            let _ = post.landed.send(result.clone());
        }
    }
}

/// Longest one group waits for JetStream's ack before its requests hear it did not come
/// (they try again, as for any publish that timed out): a stream without a leader for
/// a moment holds the stage's next group no longer than this.
const ACK_WITHIN: Duration = Duration::from_secs(1);

/// One publish for `group`: its one request as it is, or all of them in an envelope.
async fn send(js: &jetstream::Context, subject: &str, group: &mut [Post]) -> Result<(), Refusal> {
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
        Ok(acked) => acked.map(|_| ()).map_err(|e| Refusal::of(&e)),
        Err(_) => Err(Refusal {
            rejection: Rejection::Unreachable,
            text: "no publish ack within 1 s".to_owned(),
        }),
    }
}
