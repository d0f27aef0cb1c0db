//! Pulling: one loop per worker process takes an idle worker, pulls a batch sized for it,
//! answers what must not run (expired, cancelled, unfit to hand on), and starts the rest
//! on its own task.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use natserve_protocol::streams::{MAX_DELIVER, PROGRESS_EVERY};
use natserve_protocol::{headers, unix_ms, Outcome};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::batcher::{collect_batch, split_expired, Limits, Source};
use crate::handback::{hand_back_surplus, kept};
use crate::inbox::{PullError, PullInbox};
use crate::lookahead::Lookahead;
use crate::outbox::{delivered, header, is_last_delivery, MISSING_REQUEST_ID};
use crate::pool::WorkerPool;
use crate::run::{run_batch, take_holding};
use crate::stage::{StageContext, IDLE_POLL};

/// How long checking (or recreating) the stage's queue after a failed pull may take.
const QUEUE_CHECK_WITHIN: Duration = Duration::from_secs(1);

/// One pull loop: take an idle worker, pull a batch for it, start it, repeat.
///
/// What was pulled but not started yet (`held`: a prefetched batch, or the rest of one
/// whose redelivered items run one by one) stays with the loop until the next worker is
/// free, with `Progress` acks meanwhile, so JetStream hands it to no one else.
pub(crate) async fn pull_loop(
    ctx: Arc<StageContext>,
    consumer: jetstream::consumer::PullConsumer,
    pool: Arc<WorkerPool>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let limits = Limits {
        max_batch: ctx.spec.max_batch_size.get() as usize,
        max_wait: ctx.spec.max_wait(),
        idle_poll: IDLE_POLL,
        keep_alive: PROGRESS_EVERY,
    };
    let mut source = loop {
        let inbox = PullInbox::new(
            &ctx.client,
            ctx.js.clone(),
            consumer.clone(),
            ctx.envelopes.clone(),
        );
        match inbox.await {
            Ok(source) => break source,
            Err(e) => {
                warn!(route = %ctx.spec.route, stage = ctx.spec.stage, error = %e, "cannot subscribe a pull inbox");
                tokio::select! {
                    _ = cancel.cancelled() => {
                        ctx.outbox.release(&ctx.envelopes.close()).await;
                        return;
                    }
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        }
    };
    let returns = pool.sender();
    let mut held: Vec<jetstream::Message> = Vec::new();
    loop {
        if held.is_empty() && ctx.lookahead.ahead() {
            let Some(batch) = pull(&ctx, &consumer, &pool, &mut source, limits, &cancel).await
            else {
                break;
            };
            held = batch;
        }
        let Some(worker) = take_holding(&ctx, &pool, &cancel, &held).await else {
            ctx.outbox.release(&held).await;
            break;
        };
        if held.is_empty() {
            let Some(batch) = pull(&ctx, &consumer, &pool, &mut source, limits, &cancel).await
            else {
                returns.put(worker);
                break;
            };
            held = batch;
        }
        let live = triage(&ctx, std::mem::take(&mut held)).await;
        let (run, rest) = next_run(live, delivered);
        held = rest;
        if run.is_empty() {
            returns.put(worker);
            continue;
        }
        tracker.spawn(run_batch(
            ctx.clone(),
            pool.clone(),
            worker,
            run,
            cancel.clone(),
        ));
    }
    // Letters of an envelope this loop will not run: back, so their envelope is.
    ctx.outbox.release(&source.take_overflow()).await;
}

/// Splits what runs now on one worker from what waits for the next. An item delivered
/// before (its worker or agent died while it ran, or it was handed back) runs alone: if
/// it is what killed a worker, it does not take batch-mates down a second time, and if it
/// does kill its worker again it is answered alone (`crate::run`). Redelivered items go
/// first: they are the oldest.
pub(crate) fn next_run<T>(items: Vec<T>, delivered: impl Fn(&T) -> i64) -> (Vec<T>, Vec<T>) {
    match items.iter().position(|m| delivered(m) > 1) {
        Some(i) => {
            let mut rest = items;
            let alone = rest.remove(i);
            (vec![alone], rest)
        }
        None => (items, Vec::new()),
    }
}

/// Answers the messages of a batch that must not run, and returns the rest.
pub(crate) async fn triage(
    ctx: &StageContext,
    batch: Vec<jetstream::Message>,
) -> Vec<jetstream::Message> {
    let (untrusted, batch): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|m| ctx.outbox.untrusted_reply(m));
    for msg in untrusted {
        ctx.outbox.refuse_reply_subject(&msg).await;
    }
    let (live, expired) = split_expired(batch, unix_ms(), |m| {
        headers::deadline_ms(m.headers.as_ref())
    });
    for msg in expired {
        let body = format!(
            "deadline passed before stage {} of {} ran",
            ctx.spec.stage, ctx.spec.route
        );
        ctx.outbox
            .finish(&msg, Outcome::Timeout, body.into(), None)
            .await;
    }
    let (live, cancelled) = drop_cancelled(ctx, live);
    for msg in cancelled {
        ctx.outbox.drop_unanswered(&msg).await;
    }
    // Delivered before: an earlier run may have finished and recorded its answer, its
    // ack lost (a JetStream cluster electing the consumer's leader): answer from the
    // record rather than run it again, or count its delivery against it.
    let mut unanswered = Vec::with_capacity(live.len());
    for msg in live {
        if delivered(&msg) > 1 && ctx.outbox.answer_from_record(&msg).await {
            continue;
        }
        unanswered.push(msg);
    }
    let live = unanswered;
    // JetStream makes no delivery after this one: answer it rather than risk losing it
    // unanswered in the queue, since every earlier run of it failed.
    let (exhausted, live): (Vec<_>, Vec<_>) = live
        .into_iter()
        .partition(|m| is_last_delivery(delivered(m)));
    for msg in exhausted {
        warn!(route = %ctx.spec.route, stage = ctx.spec.stage, request_id = crate::ids::request_id(&msg), trace_id = crate::ids::trace_id(&msg), "last delivery of a request every run of which failed; answering it");
        let body = format!(
            "internal error: stage {} of {} was delivered {} times and never finished (its workers or agents kept failing)",
            ctx.spec.stage, ctx.spec.route, MAX_DELIVER
        );
        ctx.outbox
            .finish(&msg, Outcome::ServerError, body.into(), None)
            .await;
    }
    // Its result could not be handed on (see `outbox::handoff_headers`): say so now,
    // before a worker spends time on it.
    let (live, anonymous): (Vec<_>, Vec<_>) = live.into_iter().partition(|m| {
        !ctx.outbox.hands_off(m) || header(m, headers::REQUEST_ID).is_some_and(|id| !id.is_empty())
    });
    for msg in anonymous {
        let body = Bytes::from_static(MISSING_REQUEST_ID.as_bytes());
        ctx.outbox
            .finish(&msg, Outcome::ClientError, body, None)
            .await;
    }
    live
}

/// Splits off the messages whose request was cancelled by its ingress. An asynchronous
/// job (`X-Result-Key`) is never cancelled: nobody waits on a connection for it.
fn drop_cancelled(
    ctx: &StageContext,
    batch: Vec<jetstream::Message>,
) -> (Vec<jetstream::Message>, Vec<jetstream::Message>) {
    if ctx.cancelled.is_empty() {
        return (batch, Vec::new());
    }
    batch.into_iter().partition(|msg| {
        header(msg, headers::RESULT_KEY).is_some()
            || header(msg, headers::REQUEST_ID).is_none_or(|id| !ctx.cancelled.contains(id))
    })
}

/// Pulls the next batch, renewing idle polls and backing off after errors; `None` once
/// `cancel` fires. A poll in flight is finished, not dropped, so no message is stranded.
async fn pull(
    ctx: &StageContext,
    consumer: &jetstream::consumer::PullConsumer,
    pool: &WorkerPool,
    source: &mut PullInbox,
    limits: Limits,
    cancel: &CancellationToken,
) -> Option<Vec<jetstream::Message>> {
    loop {
        // What it pulls goes on to the next stage here: only while that one keeps up.
        ctx.outbox.wait_for_next(cancel).await;
        if cancel.is_cancelled() {
            return None;
        }
        // What it pulls beyond the batch, its pulls that stay open at the server bring
        // later: no more than the next stage here takes soon too.
        let room = kept(ctx, pool, limits.max_batch).saturating_sub(ctx.envelopes.waiting_count());
        source.set_room(ctx.outbox.next_room().map_or(room, |next| room.min(next)));
        let mut timed = Timed {
            inner: &mut *source,
            lookahead: &ctx.lookahead,
        };
        match collect_batch(&mut timed, limits).await {
            Ok(Some(batch)) => {
                hand_back_surplus(ctx, consumer, pool, limits.max_batch).await;
                return Some(batch);
            }
            Ok(None) => continue,
            Err(e) => {
                warn!(route = %ctx.spec.route, stage = ctx.spec.stage, error = %e, "pull failed");
                // A reconnect to a server that lost the queue heals here, at once; a
                // pull nothing serves is retried after the pause. A consumer whose
                // JetStream cluster is electing its leader answers no pull and no
                // question either: the check is bounded, and its wait is the pause, so
                // pulls resume within about that bound of the election's end.
                if e.may_have_lost_the_queue() {
                    match tokio::time::timeout(QUEUE_CHECK_WITHIN, ctx.ensure_queue()).await {
                        Ok(true) if matches!(e, PullError::Reconnected) => continue,
                        Err(_) => continue,
                        Ok(_) => {}
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        }
    }
}

/// The pull inbox, timing each pull that did not wait for work to arrive: a `no_wait`
/// pull, or one that came back full with more still queued behind it. Those take one
/// round trip; the rest include the wait for a request (see [`crate::lookahead`]).
struct Timed<'a> {
    inner: &'a mut PullInbox,
    lookahead: &'a Lookahead,
}

impl Source for Timed<'_> {
    type Item = jetstream::Message;
    type Error = PullError;

    async fn pull(&mut self, max: usize, wait: Duration) -> Result<Vec<Self::Item>, Self::Error> {
        let started = Instant::now();
        // Letters left over from an envelope come without a round trip: not a sample.
        let local = self.inner.has_overflow();
        let got = self.inner.pull(max, wait).await?;
        let queued_behind = || {
            got.len() == max
                && got
                    .last()
                    .and_then(|m| m.info().ok())
                    .is_some_and(|i| i.pending > 0)
        };
        if !local && (wait.is_zero() || queued_behind()) {
            self.lookahead.observe_pull(started.elapsed());
        }
        Ok(got)
    }

    async fn keep_alive(&mut self, held: &[Self::Item]) {
        self.inner.keep_alive(held).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivered_item_runs_alone_and_first() {
        let (run, rest) = next_run(vec![(1, 1), (2, 2), (3, 1), (4, 3)], |m| m.1);
        assert_eq!(run, vec![(2, 2)]);
        assert_eq!(rest, vec![(1, 1), (3, 1), (4, 3)]);
        let (run, rest) = next_run(rest, |m| m.1);
        assert_eq!((run, rest), (vec![(4, 3)], vec![(1, 1), (3, 1)]));
    }

    #[test]
    fn first_deliveries_run_together() {
        let (run, rest) = next_run(vec![(1, 1), (2, 1)], |m| m.1);
        assert_eq!((run, rest), (vec![(1, 1), (2, 1)], vec![]));
        let (run, rest) = next_run(Vec::<(u8, i64)>::new(), |m| m.1);
        assert!(run.is_empty() && rest.is_empty());
    }
}
