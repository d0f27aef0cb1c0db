//! Hand-backs: the letters waiting on this agent beyond what its workers will start soon
//! go back to the stage's stream while another agent asks for work. An envelope can
//! bring more than one batch, and what a slow agent keeps waits behind its batches while
//! a faster one idles.
//!
//! Asked when a pull leaves a rest ([`hand_back_surplus`]), and again while a rest is
//! held on a stage whose batches are long next to a pull ([`keep_asking`]): the other
//! agent may ask for work only after this one pulled. A stage whose batches are short
//! keeps its rest unless another agent asks, so after an answer that none did it does not
//! ask again for a while ([`Questions`]): each question is three broker messages (the
//! request, its answer and the server's API advisory), and a lone agent whose pulls bring
//! a rest would otherwise ask after every pull.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::outbox::delivered;
use crate::pool::WorkerPool;
use crate::stage::{StageContext, IDLE_POLL};

/// How long a question to the server about the stage's consumer may take.
const ASK_WITHIN: Duration = Duration::from_millis(250);

/// How many quarters of a batch apart [`keep_asking`] asks at the most (four batches),
/// after answers that no other agent was asking.
const MOST_QUARTERS_APART: u32 = 16;

/// How long a stage whose batches are short asks no more whether another agent pulls,
/// after an answer that none did. A new agent pulls the stream itself meanwhile.
const QUIET_AFTER_NONE: Duration = Duration::from_millis(50);

/// When a stage whose batches are short may next ask whether another agent pulls.
#[derive(Debug, Default)]
pub struct Questions {
    quiet_until: Mutex<Option<Instant>>,
}

impl Questions {
    fn may_ask(&self, now: Instant) -> bool {
        self.quiet().is_none_or(|until| now >= until)
    }

    /// After an answer: quiet for a while if no other agent was asking.
    fn answered(&self, another_asked: bool, now: Instant) {
        *self.quiet() = (!another_asked).then_some(now + QUIET_AFTER_NONE);
    }

    fn quiet(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.quiet_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many letters may wait on this agent beyond the batch a loop is pulling: a batch
/// for each of the stage's other free workers, and a batch per worker for each round
/// that starts within a few pull round trips ([`crate::Lookahead::rounds_kept`]).
pub(crate) fn kept(ctx: &StageContext, pool: &WorkerPool, max_batch: usize) -> usize {
    kept_beside(ctx, pool, max_batch, other_free(pool))
}

/// The stage's free workers other than a pulling loop's own, which is free until its
/// batch starts.
fn other_free(pool: &WorkerPool) -> usize {
    pool.stats().free().saturating_sub(1) as usize
}

fn kept_beside(ctx: &StageContext, pool: &WorkerPool, max_batch: usize, others: usize) -> usize {
    let ahead = ctx.lookahead.rounds_kept() * pool.stats().ready() as usize;
    (others + ahead) * max_batch
}

/// After a pull: gives back what waits beyond [`kept`], up to a batch per pull request of
/// another agent waiting at the server (asked only when there is a rest: a lone agent
/// keeps what it has), to the stage's stream ([`crate::outbox::Outbox::hand_back`]).
pub(crate) async fn hand_back_surplus(
    ctx: &StageContext,
    consumer: &PullConsumer,
    pool: &WorkerPool,
    max_batch: usize,
) {
    let short = ctx.lookahead.long_batch().is_none();
    if short && !ctx.questions.may_ask(Instant::now()) {
        return;
    }
    let keep = kept(ctx, pool, max_batch);
    let asked = give_back(ctx, consumer, keep, other_free(pool), max_batch).await;
    if let (true, Some(another)) = (short, asked) {
        ctx.questions.answered(another, Instant::now());
    }
}

/// Gives back what waits beyond `keep` letters, a batch per pull of another agent
/// waiting (the server's count less `ours`, this agent's loops that are pulling). Whether
/// another agent was asking; `None` when there was nothing to give or no answer.
async fn give_back(
    ctx: &StageContext,
    consumer: &PullConsumer,
    keep: usize,
    ours: usize,
    max_batch: usize,
) -> Option<bool> {
    if !may_give_back(ctx, keep) {
        return None;
    }
    let (pulls, queued) = queue_now(consumer).await?;
    let foreign = pulls.saturating_sub(ours);
    let most = most_back(
        foreign,
        ctx.lookahead.long_batch().is_some(),
        ctx.envelopes.letters_in(queued),
        max_batch,
    );
    let surplus = ctx.envelopes.take_beyond(keep, most, |m| stays(ctx, m));
    if !surplus.is_empty() {
        ctx.metrics.handed_back.inc_by(surplus.len() as u64);
        ctx.outbox.hand_back(&surplus).await;
    }
    Some(foreign > 0)
}

/// Whether a letter waiting here must not go back to the stream: one delivered before
/// (see [`crate::envelopes::Envelopes::take_beyond`]), or one the stage before handed on
/// here. Those the stage before hands on are bounded where they are made instead: it
/// pulls only while few wait here ([`crate::local`]).
fn stays(ctx: &StageContext, msg: &jetstream::Message) -> bool {
    delivered(msg) > 1 || crate::local::handed_on_here(ctx, msg)
}

/// Whether letters beyond the `keep` the workers start soon wait here, any of which
/// may go back: only then is the server asked whether another agent wants them.
fn may_give_back(ctx: &StageContext, keep: usize) -> bool {
    ctx.envelopes.waiting_count() > keep && ctx.envelopes.waiting_where(|m| !stays(ctx, m)) > 0
}

/// How many of the letters beyond those kept go back: a batch per pull of another agent
/// waiting at the server; where batches are long (what waits here waits a batch) and
/// the stream holds less than a batch (what goes back is next in line for whichever
/// agent pulls first, this one if it is alone), all of them; otherwise none: a lone
/// agent whose batches are short starts them soon, and sending them round the stream
/// would cost it a publish per pull for nothing.
fn most_back(foreign: usize, long_batches: bool, queued: usize, max_batch: usize) -> usize {
    if foreign > 0 {
        foreign * max_batch
    } else if long_batches && queued < max_batch {
        usize::MAX
    } else {
        0
    }
}

/// How many pull requests wait at the server for the stage's work now (every agent's,
/// this one's too), and how many messages wait in its stream; `None` when the server
/// did not say within [`ASK_WITHIN`].
async fn queue_now(consumer: &PullConsumer) -> Option<(usize, usize)> {
    let mut consumer = consumer.clone();
    match tokio::time::timeout(ASK_WITHIN, consumer.info()).await {
        Ok(Ok(info)) => Some((info.num_waiting, info.num_pending as usize)),
        _ => None,
    }
}

/// While letters wait beyond what the workers start soon, on a stage whose batches take
/// longer than [`crate::lookahead::PAYS_WITHIN`] pull round trips: asks again every
/// quarter of a batch whether another agent wants them. Otherwise they wait here for a
/// whole batch, since the one question after the pull found no other agent asking at
/// that moment. After answers that none was, it asks less often (down to one question
/// per four batches, [`MOST_QUARTERS_APART`]), so a lone agent with a backlog costs the
/// server little.
pub(crate) async fn keep_asking(
    ctx: Arc<StageContext>,
    consumer: PullConsumer,
    pool: Arc<WorkerPool>,
    cancel: CancellationToken,
) {
    let max_batch = ctx.spec.max_batch_size.get() as usize;
    // In quarters of a batch.
    let mut apart = 1;
    loop {
        // A stage whose batches are short is looked at again after a while, not woken by
        // every envelope it opens.
        let Some(batch) = ctx.lookahead.long_batch() else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        };
        let spilled = ctx.envelopes.spilled();
        tokio::pin!(spilled);
        spilled.as_mut().enable();
        // Every free worker's loop takes letters itself: none of them is another agent's.
        let free = pool.stats().free() as usize;
        let keep = kept_beside(&ctx, &pool, max_batch, free);
        if !may_give_back(&ctx, keep) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut spilled => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(batch / 4 * apart) => {}
        }
        let free = pool.stats().free() as usize;
        let keep = kept_beside(&ctx, &pool, max_batch, free);
        match give_back(&ctx, &consumer, keep, free, max_batch).await {
            Some(true) => apart = 1,
            Some(false) => apart = (apart * 2).min(MOST_QUARTERS_APART),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_goes_back_follows_who_asks_and_how_long_it_would_wait_here() {
        // Another agent's pulls wait: a batch for each.
        assert_eq!(most_back(2, false, 100, 8), 16);
        assert_eq!(most_back(1, true, 100, 8), 8);
        // Nobody asks, short batches: kept, it starts soon.
        assert_eq!(most_back(0, false, 0, 8), 0);
        // Nobody asks, long batches: back while the stream is short, kept behind a long one.
        assert_eq!(most_back(0, true, 7, 8), usize::MAX);
        assert_eq!(most_back(0, true, 8, 8), 0);
    }

    #[test]
    fn after_an_answer_that_nobody_asked_a_short_stage_asks_again_only_later() {
        let questions = Questions::default();
        let now = Instant::now();
        assert!(questions.may_ask(now));
        questions.answered(false, now);
        assert!(!questions.may_ask(now + QUIET_AFTER_NONE / 2));
        assert!(questions.may_ask(now + QUIET_AFTER_NONE));
        // Another agent asked: ask after every pull.
        questions.answered(true, now);
        assert!(questions.may_ask(now));
    }
}
