//! Pulling: one loop per worker process takes an idle worker, pulls a batch sized for it,
//! answers what must not run (expired, cancelled, unfit to hand on), and starts the rest
//! on its own task.

use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use natserve_protocol::{headers, unix_ms, Outcome};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::batcher::{collect_batch, split_expired, Limits};
use crate::inbox::PullInbox;
use crate::outbox::{header, MISSING_REQUEST_ID};
use crate::pool::WorkerPool;
use crate::run::run_batch;
use crate::stage::{StageContext, IDLE_POLL};

/// One pull loop: take an idle worker, pull a batch for it, start it, repeat.
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
    };
    let mut source = loop {
        match PullInbox::new(&ctx.client, ctx.js.clone(), consumer.clone()).await {
            Ok(source) => break source,
            Err(e) => {
                warn!(route = %ctx.spec.route, stage = ctx.spec.stage, error = %e, "cannot subscribe a pull inbox");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        }
    };
    let returns = pool.sender();
    loop {
        let (worker, batch) = if ctx.prefetch {
            let Some(batch) = pull(&ctx, &mut source, limits, &cancel).await else {
                break;
            };
            let Some(worker) = pool.take_unless(&cancel).await else {
                ctx.outbox.release(&batch).await;
                break;
            };
            (worker, batch)
        } else {
            let Some(worker) = pool.take_unless(&cancel).await else {
                break;
            };
            let Some(batch) = pull(&ctx, &mut source, limits, &cancel).await else {
                returns.put(worker);
                break;
            };
            (worker, batch)
        };
        let live = triage(&ctx, batch).await;
        if live.is_empty() {
            returns.put(worker);
            continue;
        }
        tracker.spawn(run_batch(
            ctx.clone(),
            pool.clone(),
            worker,
            live,
            cancel.clone(),
        ));
    }
}

/// Answers the messages of a batch that must not run, and returns the rest.
pub(crate) async fn triage(
    ctx: &StageContext,
    batch: Vec<jetstream::Message>,
) -> Vec<jetstream::Message> {
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
    if !ctx.outbox.hands_off() {
        return live;
    }
    // Its result could not be handed on (see `outbox::handoff_headers`): say so now,
    // before a worker spends time on it.
    let (live, anonymous): (Vec<_>, Vec<_>) = live
        .into_iter()
        .partition(|m| header(m, headers::REQUEST_ID).is_some_and(|id| !id.is_empty()));
    for msg in anonymous {
        let body = Bytes::from_static(MISSING_REQUEST_ID.as_bytes());
        ctx.outbox
            .finish(&msg, Outcome::ClientError, body, None)
            .await;
    }
    live
}

/// Splits off the messages whose request was cancelled by its ingress.
fn drop_cancelled(
    ctx: &StageContext,
    batch: Vec<jetstream::Message>,
) -> (Vec<jetstream::Message>, Vec<jetstream::Message>) {
    if ctx.cancelled.is_empty() {
        return (batch, Vec::new());
    }
    batch.into_iter().partition(|msg| {
        header(msg, headers::REQUEST_ID).is_none_or(|id| !ctx.cancelled.contains(id))
    })
}

/// Pulls the next batch, renewing idle polls and backing off after errors; `None` once
/// `cancel` fires. A poll in flight is finished, not dropped, so no message is stranded.
async fn pull(
    ctx: &StageContext,
    source: &mut PullInbox,
    limits: Limits,
    cancel: &CancellationToken,
) -> Option<Vec<jetstream::Message>> {
    loop {
        if cancel.is_cancelled() {
            return None;
        }
        match collect_batch(source, limits).await {
            Ok(Some(batch)) => return Some(batch),
            Ok(None) => continue,
            Err(e) => {
                warn!(route = %ctx.spec.route, stage = ctx.spec.stage, error = %e, "pull failed");
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        }
    }
}
