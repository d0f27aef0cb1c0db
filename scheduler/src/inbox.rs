//! Pull requests over one long-lived inbox subscription per pull loop.
//!
//! async-nats's `batch()`/`fetch()` subscribe a fresh inbox for every pull and unsubscribe
//! it afterwards: two more protocol operations and a subscription set-up per pull, on the
//! path between a worker turning idle and its next batch. A stage runs one pull loop per
//! worker process, each with its own `PullInbox` and one pull it waits on at a time, so
//! each loop can instead subscribe once to `<inbox>.*` and send each pull request
//! (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`) with its own reply subject
//! `<inbox>.<n>`. Work messages arrive with their stream subject; the server's status
//! messages (404 no messages, 408 request expired, 409 ...) arrive on the reply subject
//! of the request they end, so a late status of an earlier request is told apart and
//! ignored.
//!
//! A waiting request asks for the letters its batch wants and the room the stage keeps
//! beyond them (the look-ahead's). Once the batch is in, the request stays open at the
//! server (standing): what it brings after waits on the agent to run, and the loop's next
//! pulls wait on it rather than send another request while it may still bring messages.
//! A fast stage then sends a pull request per few messages it runs, not one per message.
//!
//! A reconnect loses the pull request in flight (a restarted server forgets it), so the
//! wait for it also watches the client's connect count and gives up at once
//! ([`PullError::Reconnected`]): the stage then checks its stream and consumer still
//! exist (a server with memory storage comes back empty) instead of idling out the poll.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::BatchConfig};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;
use tokio::sync::mpsc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::batcher::Source;
use crate::envelopes::{is_envelope, Envelopes};
use crate::stage::IDLE_POLL;

mod delivery;
pub use delivery::{classify, Delivery};

/// How long after a pull request should have ended we stop waiting for the server's word
/// (a lost status, a reconnect that dropped the request).
const STATUS_GRACE: Duration = Duration::from_secs(5);
/// How often a waiting pull looks at the client's connect count.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pull request: {0}")]
    Request(#[from] jetstream::consumer::pull::BatchRequestError),
    #[error("subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("pull ended with status {status}: {description}")]
    Status {
        status: StatusCode,
        description: String,
    },
    #[error("pull inbox subscription closed")]
    Closed,
    #[error("reconnected to nats while a pull was in flight")]
    Reconnected,
}

impl PullError {
    /// Whether the stage's stream or consumer may be gone: the server answered that
    /// nothing serves the pull (503 no responders, 409 consumer deleted), or the
    /// connection was re-established, possibly to a server that lost them.
    pub fn may_have_lost_the_queue(&self) -> bool {
        match self {
            PullError::Reconnected => true,
            PullError::Status { status, .. } => {
                *status == StatusCode::NO_RESPONDERS || *status == StatusCode::REQUEST_TERMINATED
            }
            _ => false,
        }
    }
}

/// A stage's pull consumer, as one pull loop pulls it: through one inbox subscription.
///
/// A reader task takes everything that arrives on the inbox (an envelope opened into one
/// message per letter). While the loop waits on its pull, its work and the server's
/// statuses go to it, and letters beyond its batch go to the stage's queue of letters
/// ready to run ([`Envelopes::spill`]), which any pull loop of the stage takes first and
/// where they are kept alive until taken. Work that arrives while the loop does not
/// wait (its request brought more after the loop had its batch from an envelope) goes to
/// that queue too: it is neither lost nor left unacknowledged behind a long batch.
pub struct PullInbox {
    consumer: jetstream::consumer::PullConsumer,
    prefix: String,
    arrivals: mpsc::UnboundedReceiver<Arrival>,
    /// Whether the loop waits on a pull: the reader hands it its work only then.
    listening: Arc<Mutex<bool>>,
    reader: tokio::task::JoinHandle<()>,
    requests: u64,
    statistics: std::sync::Arc<async_nats::Statistics>,
    envelopes: Arc<Envelopes>,
    /// Letters the stage has room for beyond the batch pulled ([`PullInbox::set_room`]).
    room: usize,
    /// The waiting request still open at the server, if any.
    standing: Option<Waiting>,
    /// Messages the last waiting request may still bring: the reader counts each work
    /// message down.
    owed: Arc<AtomicUsize>,
}

impl Drop for PullInbox {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl PullInbox {
    /// The pull inbox of one loop of the stage whose letters `envelopes` holds.
    pub async fn new(
        client: &async_nats::Client,
        context: jetstream::Context,
        consumer: jetstream::consumer::PullConsumer,
        envelopes: Arc<Envelopes>,
    ) -> Result<Self, PullError> {
        let prefix = client.new_inbox();
        let subscriber = client.subscribe(format!("{prefix}.*")).await?;
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let listening = Arc::new(Mutex::new(false));
        let owed = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn(read(
            subscriber,
            context,
            envelopes.clone(),
            listening.clone(),
            owed.clone(),
            arrived,
        ));
        Ok(Self {
            consumer,
            prefix,
            arrivals,
            listening,
            reader,
            requests: 0,
            statistics: client.statistics(),
            envelopes,
            room: 0,
            standing: None,
            owed,
        })
    }

    /// Sets how many letters beyond the batch its next pulls may bring: what the stage's
    /// workers would start soon, less what waits already ([`Envelopes::messages_for`]).
    pub fn set_room(&mut self, letters: usize) {
        self.room = letters;
    }

    /// Whether letters wait to run, which the next pull then takes without asking the
    /// server.
    pub fn has_overflow(&self) -> bool {
        self.envelopes.has_waiting()
    }

    /// The letters waiting to run, which this loop will not run (it stops); the stage
    /// takes no more from its other stages here ([`Envelopes::close`]).
    pub fn take_overflow(&mut self) -> Vec<jetstream::Message> {
        self.envelopes.close()
    }
}

fn lock(flag: &Mutex<bool>) -> std::sync::MutexGuard<'_, bool> {
    flag.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the reader hands its loop.
enum Arrival {
    /// One work message's letters (itself, unless it was an envelope).
    Work(Vec<jetstream::Message>),
    /// A status of the server (the end of a request, an error).
    Status(async_nats::Message),
}

/// The reader task of one pull inbox (see [`PullInbox`]).
async fn read(
    mut subscriber: Subscriber,
    context: jetstream::Context,
    envelopes: Arc<Envelopes>,
    listening: Arc<Mutex<bool>>,
    owed: Arc<AtomicUsize>,
    arrived: mpsc::UnboundedSender<Arrival>,
) {
    while let Some(msg) = subscriber.next().await {
        let arrival = match msg.status {
            None | Some(StatusCode::OK) => {
                let _ =
                    owed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                let letters = open(&envelopes, &context, msg).await;
                envelopes.observe_message(letters.len());
                Arrival::Work(letters)
            }
            Some(StatusCode::IDLE_HEARTBEAT) => continue,
            Some(_) => Arrival::Status(msg),
        };
        let listening = lock(&listening);
        match arrival {
            Arrival::Work(letters) if !*listening => envelopes.spill(letters),
            arrival => {
                if arrived.send(arrival).is_err() {
                    return;
                }
            }
        }
    }
}

/// Work message `msg` as the messages it carries: itself, or one per letter of an
/// envelope. A malformed envelope carries none: it is terminated, since no letter of it
/// can be answered.
async fn open(
    envelopes: &Envelopes,
    context: &jetstream::Context,
    msg: async_nats::Message,
) -> Vec<jetstream::Message> {
    if !is_envelope(&msg) {
        return vec![jetstream::Message {
            message: msg,
            context: context.clone(),
        }];
    }
    match envelopes.open(msg.clone(), context) {
        Ok(letters) => letters,
        Err(e) => {
            warn!(subject = %msg.subject, error = %e, "malformed work envelope terminated unanswered");
            let msg = jetstream::Message {
                message: msg,
                context: context.clone(),
            };
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            Vec::new()
        }
    }
}

impl Source for PullInbox {
    type Item = jetstream::Message;
    type Error = PullError;

    /// Takes waiting letters first; then waits on this loop's standing request while it
    /// may still bring messages; otherwise sends pull requests sized in messages for the
    /// letters wanted and the stage's room ([`Envelopes::messages_for`]), and a further
    /// one while a request was met in full and the batch is not (its envelopes were
    /// smaller than the average), within the same `wait`.
    async fn pull(&mut self, max: usize, wait: Duration) -> Result<Vec<Self::Item>, Self::Error> {
        let waiting = self.envelopes.take(max);
        if !waiting.is_empty() {
            let stream = &self.consumer.cached_info().stream_name;
            if waiting
                .iter()
                .any(|m| crate::local::from_another_stream(m, stream))
            {
                self.stand(max).await;
            }
            return Ok(waiting);
        }
        let until = tokio::time::Instant::now() + wait;
        let mut out: Vec<jetstream::Message> = Vec::new();
        while out.len() < max {
            let left = max - out.len();
            // A zero wait stays a `no_wait` request; a wait that ran out ends the pull.
            let remaining = until.saturating_duration_since(tokio::time::Instant::now());
            if !wait.is_zero() && remaining.is_zero() {
                break;
            }
            let owed = self.standing_owes();
            if owed > 0 && !wait.is_zero() {
                let more = self.on_standing(left, until).await?;
                let got = !more.is_empty();
                out.extend(more);
                if got || self.standing_owes() > 0 {
                    // Its wait ran out, or it brought what it could: the caller decides.
                    break;
                }
                continue;
            }
            // A waiting request asks for the letters wanted and what the stage has room
            // for beyond them: what comes after the batch waits here to run (spilled),
            // and the request stays open at the server, so the pulls after this one
            // wait on it rather than ask again. A stage with no room asks for one
            // message at a time while it waits. A `no_wait` request ends at once, with
            // what is there, and asks for no more than the standing request does not
            // bring already.
            let asked = if wait.is_zero() {
                self.envelopes
                    .messages_for(left, self.room)
                    .saturating_sub(owed)
            } else if self.room == 0 {
                1
            } else {
                self.envelopes.messages_for(left + self.room, 0)
            };
            if asked == 0 {
                break;
            }
            match self.request(asked, left, remaining).await {
                Ok((more, met)) => {
                    out.extend(more);
                    if !met {
                        break;
                    }
                }
                Err(e) if out.is_empty() => return Err(e),
                // Keep what was delivered: those messages are ours to run and ack. The
                // next pull meets the error again.
                Err(_) => break,
            }
        }
        if out.len() > max {
            self.envelopes.spill(out.drain(max..));
        }
        Ok(out)
    }

    async fn keep_alive(&mut self, held: &[Self::Item]) {
        for msg in held {
            // Fire and forget: a lost one is covered by the next.
            let _ = msg.ack_with(jetstream::AckKind::Progress).await;
        }
    }
}

/// A waiting pull request of this loop, as sent; standing once the pull that sent it had
/// its letters before all its messages came (it asked for the stage's room too).
struct Waiting {
    reply: String,
    /// When the server expires it.
    ends: tokio::time::Instant,
    /// The client's connect count when it was sent: a reconnect loses it.
    connects: u64,
}

impl PullInbox {
    /// How many more messages the standing request may bring: none once it expired, was
    /// ended, or was lost to a reconnect.
    fn standing_owes(&mut self) -> usize {
        let live = self
            .standing
            .as_ref()
            .is_some_and(|s| s.ends > tokio::time::Instant::now() && s.connects == self.connects());
        if !live {
            self.standing = None;
            return 0;
        }
        self.owed.load(Ordering::Relaxed)
    }

    /// Waits until `until` for what the standing request brings, without asking again.
    async fn on_standing(
        &mut self,
        left: usize,
        until: tokio::time::Instant,
    ) -> Result<Vec<jetstream::Message>, PullError> {
        let Some(standing) = self.standing.take() else {
            return Ok(Vec::new());
        };
        let owed = self.owed.load(Ordering::Relaxed);
        let give_up = until.min(standing.ends);
        let (out, _, ended) = self.listen(&standing, owed, left, give_up).await?;
        if ended {
            self.end_standing();
        } else {
            self.standing = Some(standing);
        }
        Ok(out)
    }

    /// Keeps a waiting request open at the server while the loop runs letters the stage
    /// before on this agent handed on: what the stream holds meanwhile (another agent's
    /// hand-offs, a result too large to hand on here) then arrives behind them and runs
    /// in turn, rather than waiting until they run out. It asks for a batch of `max` and the stage's room,
    /// and lasts an idle poll; a stream with nothing in it costs a request a poll.
    async fn stand(&mut self, max: usize) {
        if self.standing_owes() > 0 {
            return;
        }
        self.requests += 1;
        let connects = self.connects();
        let reply = format!("{}.{}", self.prefix, self.requests);
        let asked = self.envelopes.messages_for(max + self.room, 0);
        let request = BatchConfig {
            batch: asked,
            expires: Some(IDLE_POLL),
            ..Default::default()
        };
        self.end_standing();
        self.owed.store(asked, Ordering::Relaxed);
        let ends = tokio::time::Instant::now() + IDLE_POLL;
        if self
            .consumer
            .request_batch(request, reply.clone().into())
            .await
            .is_err()
        {
            // The next pull that goes to the server meets the error.
            self.end_standing();
            return;
        }
        self.standing = Some(Waiting {
            reply,
            ends,
            connects,
        });
    }

    fn end_standing(&mut self) {
        self.standing = None;
        self.owed.store(0, Ordering::Relaxed);
    }

    /// One pull request for `asked` messages, waiting `wait` for them (zero: `no_wait`):
    /// the letters it brought, at least `left` unless the server ended it first, and
    /// whether all `asked` messages came (the queue may hold more). A waiting request
    /// that had `left` letters before all its messages came stays standing.
    async fn request(
        &mut self,
        asked: usize,
        left: usize,
        wait: Duration,
    ) -> Result<(Vec<jetstream::Message>, bool), PullError> {
        self.requests += 1;
        let connects = self.connects();
        let reply = format!("{}.{}", self.prefix, self.requests);
        // A zero wait is a `no_wait` request: the server answers at once with what it has
        // (up to `asked`), then a 404/408 status; otherwise it holds the request for `wait`.
        let request = BatchConfig {
            batch: asked,
            expires: (!wait.is_zero()).then_some(wait),
            no_wait: wait.is_zero(),
            ..Default::default()
        };
        let sent = tokio::time::Instant::now();
        if !wait.is_zero() {
            // The reader counts every work message down from here.
            self.end_standing();
            self.owed.store(asked, Ordering::Relaxed);
        }
        // Listening before the request goes: its first messages can come before `listen`
        // begins, and the reader would spill them to the stage's queue uncounted; a
        // request met in full then ends with no status, and the pull would wait out its
        // expiry and the grace for its messages (seen: a stage idle 5 s under load).
        *lock(&self.listening) = true;
        if let Err(e) = self
            .consumer
            .request_batch(request, reply.clone().into())
            .await
        {
            *lock(&self.listening) = false;
            return Err(e.into());
        }
        let waiting = Waiting {
            reply,
            ends: sent + wait,
            connects,
        };
        let give_up = waiting.ends + STATUS_GRACE;
        let (out, received, ended) = self.listen(&waiting, asked, left, give_up).await?;
        let met = received >= asked;
        if !ended && !met && out.len() < left && tokio::time::Instant::now() >= give_up {
            warn!(
                asked,
                received,
                grace_ms = STATUS_GRACE.as_millis() as u64,
                "a pull request's end never came; gave up waiting on it"
            );
        }
        if !wait.is_zero() {
            if ended || met {
                self.end_standing();
            } else {
                self.standing = Some(waiting);
            }
        }
        Ok((out, met))
    }

    /// Collects what request `waiting` brings: all `asked` of its messages or at least
    /// `max` letters, or what came when the server ended it or `give_up` passed, with the
    /// count of messages received and whether the server ended it. Letters another loop
    /// spilled count too. From its end the reader leaves new work to the stage's queue;
    /// what it handed over meanwhile is taken too.
    async fn listen(
        &mut self,
        waiting: &Waiting,
        asked: usize,
        max: usize,
        give_up: tokio::time::Instant,
    ) -> Result<(Vec<jetstream::Message>, usize, bool), PullError> {
        *lock(&self.listening) = true;
        let listened = self.collect(waiting, asked, max, give_up).await;
        let listening_flag = self.listening.clone();
        let mut listening = lock(&listening_flag);
        *listening = false;
        let (mut out, mut received, ended) = listened?;
        while let Ok(arrival) = self.arrivals.try_recv() {
            if let Arrival::Work(letters) = arrival {
                received += 1;
                out.extend(letters);
            }
        }
        drop(listening);
        Ok((out, received, ended))
    }

    async fn collect(
        &mut self,
        waiting: &Waiting,
        asked: usize,
        max: usize,
        give_up: tokio::time::Instant,
    ) -> Result<(Vec<jetstream::Message>, usize, bool), PullError> {
        // Not `interval`: its first tick is due at once, an extra wake-up per pull.
        let mut check = tokio::time::interval_at(
            tokio::time::Instant::now() + RECONNECT_CHECK,
            RECONNECT_CHECK,
        );
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out: Vec<jetstream::Message> = Vec::new();
        // Counted in messages, as the pull request is: an envelope brings several letters.
        let mut received = 0;
        while received < asked && out.len() < max {
            // Registered before looking, so letters spilled after the look wake us.
            let spilled = self.envelopes.spilled();
            tokio::pin!(spilled);
            spilled.as_mut().enable();
            out.extend(self.envelopes.take(max - out.len()));
            if out.len() >= max {
                break;
            }
            tokio::select! {
                _ = &mut spilled => {}
                arrival = tokio::time::timeout_at(give_up, self.arrivals.recv()) => {
                    let msg = match arrival {
                        Err(_) => break,
                        Ok(None) => return Err(PullError::Closed),
                        Ok(Some(Arrival::Work(letters))) => {
                            received += 1;
                            out.extend(letters);
                            continue;
                        }
                        Ok(Some(Arrival::Status(msg))) => msg,
                    };
                    match classify(&msg, &waiting.reply) {
                        Delivery::Work | Delivery::Ignore => {}
                        Delivery::Done => return Ok((out, received, true)),
                        Delivery::Failed if out.is_empty() => {
                            return Err(PullError::Status {
                                status: msg.status.unwrap_or(StatusCode::OK),
                                description: msg.description.unwrap_or_default(),
                            })
                        }
                        // Keep what was delivered: those messages are ours to run and ack.
                        Delivery::Failed => return Ok((out, received, true)),
                    }
                }
                _ = check.tick() => {
                    if self.connects() == waiting.connects {
                        continue;
                    }
                    if out.is_empty() {
                        return Err(PullError::Reconnected);
                    }
                    return Ok((out, received, true)); // keep what was delivered: ours to run and ack
                }
            }
        }
        Ok((out, received, false))
    }

    fn connects(&self) -> u64 {
        self.statistics
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
