//! Running: one batch on one worker, kept alive with `Progress` acks, bounded by the hang
//! limit, and what a failed worker means for the batch's items. A batch that never
//! reached a live worker runs on the next one, never fails. A batch whose worker died
//! while running it goes back to the queue (`Nak`), item by item: each then runs alone
//! (`crate::pull::next_run`), so the healthy ones are answered, and an item that kills a
//! worker a second time, alone, is answered `server_error` by itself.
//!
//! While a batch runs, its worker's stream events go straight to each item's requester
//! (core NATS, numbered), and a request cancelled meanwhile is named to the worker. An
//! item that already streamed is never run again: its requester has seen part of an
//! answer, so a failure then is its answer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use natserve_protocol::payloads;
use natserve_protocol::streams::PROGRESS_EVERY;
use natserve_protocol::{headers, unix_ms, ItemIds, ItemResult, Outcome};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::ids::{self, RequestIds, TraceIds};
use crate::outbox::delivered;
use crate::pool::{BatchChannels, FailureKind, StreamEvent, WorkerConn, WorkerError, WorkerPool};
use crate::pull::triage;
use crate::stage::StageContext;

/// Without a stage timeout, a batch still running this long after its items' latest
/// deadline counts as hung: its worker is replaced. By then every requester has been
/// answered `timeout` (the ingress waits 250 ms past the deadline), so the worker only
/// blocks the requests queued behind it: one second is enough to let a batch that was
/// about to finish finish, and short enough that those requests still run.
pub const HANG_GRACE: Duration = Duration::from_secs(1);

/// How long a batch may run before its worker is considered hung: the stage's timeout,
/// else [`HANG_GRACE`] past the latest deadline among its items. `None` when neither
/// exists: then nothing bounds the batch (`timeout_ms = 0` means only the items' own
/// deadlines do, and these items have none).
pub fn hang_limit(
    timeout: Option<Duration>,
    deadlines_ms: impl IntoIterator<Item = Option<u64>>,
    now_ms: u64,
) -> Option<Duration> {
    if let Some(limit) = timeout {
        return Some(limit);
    }
    let latest = deadlines_ms.into_iter().flatten().max()?;
    Some(Duration::from_millis(latest.saturating_sub(now_ms)) + HANG_GRACE)
}

enum BatchEnd {
    Done(Vec<ItemResult>),
    Failed(WorkerError),
    Hung(Duration),
}

/// Stream events a worker may send ahead of what NATS has taken; past it the agent stops
/// reading the worker's socket until NATS catches up, and the worker waits.
const EVENTS_IN_FLIGHT: usize = 64;

/// Runs `msgs` on `worker` and hands the results on. Should the batch not reach the
/// worker (it died while idle), it goes to the next idle worker; at shutdown, back to the
/// queue.
pub(crate) async fn run_batch(
    ctx: Arc<StageContext>,
    pool: Arc<WorkerPool>,
    mut worker: WorkerConn,
    mut msgs: Vec<jetstream::Message>,
    cancel: CancellationToken,
) {
    // Bodies over one NATS message came as claim checks: fetch them (keeping the batch
    // alive meanwhile) before the worker sees the batch. A plain message skips this.
    if msgs
        .iter()
        .any(|m| payloads::claim(m.headers.as_ref()).is_some())
    {
        let claimed = msgs.clone();
        msgs = holding(ctx.outbox.check_out(msgs), || ctx.outbox.progress(&claimed)).await;
        if msgs.is_empty() {
            pool.sender().put(worker);
            return;
        }
    }
    ctx.metrics.batch_size.observe(msgs.len() as f64);
    observe_queue_wait(&ctx, &msgs);
    debug!(
        route = %ctx.spec.route,
        stage = ctx.spec.stage,
        worker = worker.label(),
        request_ids = %RequestIds(&msgs),
        trace_ids = %TraceIds(&msgs),
        "batch starts"
    );
    loop {
        let running = pool.stats().batch_running();
        let started = Instant::now();
        let (end, events) = attempt(&ctx, &mut worker, &msgs).await;
        drop(running);
        match end {
            BatchEnd::Done(results) => {
                ctx.lookahead.observe_batch(started.elapsed());
                // The worker is idle as soon as its results are in: it may pull its next
                // batch while this one's hand-offs and acks complete (each input is still
                // acked only after its result is safe).
                pool.sender().put(worker);
                // Handing on can wait on JetStream (a stream or bucket electing a leader):
                // the inputs are kept alive meanwhile, so no wait costs a delivery.
                holding(ctx.outbox.hand_on(&msgs, results, &events), || {
                    ctx.outbox.progress(&msgs)
                })
                .await;
                return;
            }
            BatchEnd::Failed(e) if e.kind() == FailureKind::NotDelivered => {
                warn!(worker = worker.label(), error = %e, items = msgs.len(), request_ids = %RequestIds(&msgs), trace_ids = %TraceIds(&msgs), "batch never reached its worker; running it on another");
                ctx.metrics.worker_failures.inc();
                drop(worker);
                // Time passed while it waited: what expired meanwhile is answered, not run.
                msgs = triage(&ctx, msgs).await;
                if msgs.is_empty() {
                    return;
                }
                let Some(next) = take_holding(&ctx, &pool, &cancel, &msgs).await else {
                    ctx.outbox.release(&msgs).await;
                    return;
                };
                worker = next;
            }
            BatchEnd::Failed(e) => {
                ctx.metrics.worker_failures.inc();
                let label = worker.label().to_owned();
                drop(worker);
                // Alone, and delivered before (a batch it was in lost its worker, or its
                // agent died): answered now, so a poison item costs at most two workers.
                if let [msg] = msgs.as_slice() {
                    if delivered(msg) > 1 {
                        error!(worker = %label, error = %e, request_id = ids::request_id(msg), trace_id = ids::trace_id(msg), "worker failed running one request alone, after an earlier failure; answering it and replacing the worker");
                        let body = Bytes::from_static(
                            b"internal error: worker process failed while running this request",
                        );
                        ctx.outbox
                            .finish(msg, Outcome::ServerError, body, None)
                            .await;
                        return;
                    }
                }
                error!(worker = %label, error = %e, items = msgs.len(), request_ids = %RequestIds(&msgs), trace_ids = %TraceIds(&msgs), "worker failed a batch; replacing it and running each item again alone");
                for (msg, &sent) in msgs.iter().zip(&events) {
                    if sent == 0 {
                        ctx.outbox.retry(msg).await;
                        continue;
                    }
                    // Its requester saw part of a stream: a second run would repeat it.
                    let body = Bytes::from_static(
                        b"internal error: worker process failed while streaming this request",
                    );
                    ctx.outbox
                        .finish_stream(msg, Outcome::ServerError, body, sent)
                        .await;
                }
                return;
            }
            BatchEnd::Hung(limit) => {
                error!(
                    worker = worker.label(),
                    limit_ms = limit.as_millis() as u64,
                    request_ids = %RequestIds(&msgs),
                    trace_ids = %TraceIds(&msgs),
                    "batch ran past its limit; replacing the worker"
                );
                ctx.metrics.worker_failures.inc();
                drop(worker);
                let body = Bytes::from(format!(
                    "stage {} of {} did not finish within {} ms",
                    ctx.spec.stage,
                    ctx.spec.route,
                    limit.as_millis()
                ));
                for (msg, &sent) in msgs.iter().zip(&events) {
                    ctx.outbox
                        .finish_stream(msg, Outcome::Timeout, body.clone(), sent)
                        .await;
                }
                return;
            }
        }
    }
}

/// How long each message waited in the stage's queue, from its publish (the NATS
/// server's clock) to now, the start of its batch (this host's): a skew between the two
/// clocks shows up as a shift, a negative wait counts as none. A letter the stage before
/// handed on here ([`crate::local`]) was never in the stage's stream: not counted.
fn observe_queue_wait(ctx: &StageContext, msgs: &[jetstream::Message]) {
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    for msg in msgs {
        if let Some(info) = msg.info().ok().filter(|i| i.stream == ctx.stream) {
            let waited_ns = (now_ns - info.published.unix_timestamp_nanos()).max(0);
            ctx.metrics
                .queue_wait_seconds
                .observe(waited_ns as f64 / 1e9);
        }
    }
}

/// Each message's ids, for the worker's log lines.
fn item_ids(msgs: &[jetstream::Message]) -> Vec<ItemIds> {
    msgs.iter()
        .map(|msg| ItemIds {
            request_id: Bytes::copy_from_slice(ids::request_id(msg).as_bytes()),
            trace_id: Bytes::copy_from_slice(ids::trace_id(msg).as_bytes()),
        })
        .collect()
}

/// Waits for the next idle worker for `msgs`, which this agent holds meanwhile: they get
/// `Progress` acks, so JetStream does not hand them to another agent as well. `None` once
/// `cancel` fires.
pub(crate) async fn take_holding(
    ctx: &StageContext,
    pool: &WorkerPool,
    cancel: &CancellationToken,
    msgs: &[jetstream::Message],
) -> Option<WorkerConn> {
    let next = pool.take_unless(cancel);
    if msgs.is_empty() {
        return next.await;
    }
    holding(next, || ctx.outbox.progress(msgs)).await
}

/// Awaits `wait`, calling `keep_alive` every [`PROGRESS_EVERY`] until it is done. The
/// first keep-alive is one period in: a timer due "now" is not free, tokio rounds its
/// deadline up to the next millisecond, so an immediate first tick would make every
/// batch wait about a millisecond for nothing.
pub(crate) async fn holding<T, K: Future<Output = ()>>(
    wait: impl Future<Output = T>,
    mut keep_alive: impl FnMut() -> K,
) -> T {
    let mut progress = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            biased;
            done = &mut wait => return done,
            _ = progress.tick() => keep_alive().await,
        }
    }
}

/// One try of the batch on one worker, and how many stream events each item sent.
async fn attempt(
    ctx: &StageContext,
    worker: &mut WorkerConn,
    msgs: &[jetstream::Message],
) -> (BatchEnd, Vec<u32>) {
    let started = Instant::now();
    let payloads: Vec<Bytes> = msgs.iter().map(|m| m.payload.clone()).collect();
    let limit = hang_limit(
        ctx.spec.batch_timeout(),
        msgs.iter()
            .map(|m| headers::deadline_ms(m.headers.as_ref())),
        unix_ms(),
    );
    let (events, mut streamed) = mpsc::channel(EVENTS_IN_FLIGHT);
    let (cancel, cancels) = mpsc::unbounded_channel();
    let mut channels = BatchChannels { events, cancels };
    let mut items = ItemStreams::new(msgs.len());
    let mut cancelled = ctx.cancelled.subscribe();
    // A cancel may have come between triage and now.
    cancelled.mark_changed();
    let edges = ctx
        .outbox
        .places()
        .edges(msgs.iter().map(|m| m.subject.as_str()));
    let run = worker.run_with(payloads, item_ids(msgs), edges, &mut channels);
    tokio::pin!(run);
    let mut progress = tokio::time::interval_at(started + PROGRESS_EVERY, PROGRESS_EVERY);
    let hang = async {
        match limit {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(hang);
    let end = loop {
        tokio::select! {
            result = &mut run => break match result {
                Ok(results) => BatchEnd::Done(results),
                Err(e) => BatchEnd::Failed(e),
            },
            Some(event) = streamed.recv() => items.publish(ctx, msgs, event).await,
            Ok(()) = cancelled.changed() => {
                for index in items.newly_cancelled(ctx, msgs) {
                    let _ = cancel.send(index);
                }
            }
            _ = progress.tick() => ctx.outbox.progress(msgs).await,
            _ = &mut hang => break BatchEnd::Hung(limit.unwrap_or_default()),
        }
    };
    // Events the worker sent before its results go out before the reply that ends them.
    while let Ok(event) = streamed.try_recv() {
        items.publish(ctx, msgs, event).await;
    }
    ctx.metrics
        .batch_seconds
        .observe(started.elapsed().as_secs_f64());
    (end, items.sent)
}

/// Per item of a running batch: events published, and whether its worker was told that
/// the requester went away.
struct ItemStreams {
    sent: Vec<u32>,
    cancelled: Vec<bool>,
}

impl ItemStreams {
    fn new(len: usize) -> Self {
        Self {
            sent: vec![0; len],
            cancelled: vec![false; len],
        }
    }

    /// Publishes one event to its item's requester, numbered from 1. A cancelled item's
    /// events go nowhere: nobody reads them.
    async fn publish(
        &mut self,
        ctx: &StageContext,
        msgs: &[jetstream::Message],
        event: StreamEvent,
    ) {
        let i = event.index as usize;
        if self.cancelled[i] {
            return;
        }
        if ctx.outbox.hands_off(&msgs[i]) {
            warn!(route = %ctx.spec.route, stage = ctx.spec.stage, "a stage before the last sent a stream event; dropped");
            return;
        }
        self.sent[i] += 1;
        ctx.outbox
            .stream_event(&msgs[i], self.sent[i], event.body)
            .await;
    }

    /// Items whose request was cancelled since the last look.
    fn newly_cancelled(&mut self, ctx: &StageContext, msgs: &[jetstream::Message]) -> Vec<u32> {
        let mut out = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            let id = ids::request_id(msg);
            if !self.cancelled[i] && !id.is_empty() && ctx.cancelled.contains(id) {
                self.cancelled[i] = true;
                out.push(i as u32);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    /// Real time on purpose: under a paused clock a timer due "now" fires at once, so only
    /// the real timer wheel shows the millisecond each batch used to wait. A thousand
    /// takes of an idle worker then cost at least half a second; without a timer, well
    /// under a millisecond each even on a loaded machine.
    #[tokio::test]
    async fn what_is_ready_is_taken_without_waiting_for_a_timer() {
        let kept = std::cell::Cell::new(0);
        let start = std::time::Instant::now();
        for i in 0..1000 {
            let got = holding(std::future::ready(i), || async { kept.set(kept.get() + 1) }).await;
            assert_eq!(got, i);
        }
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(250),
            "1000 ready takes took {took:?}"
        );
        assert_eq!(kept.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_wait_keeps_what_it_holds_alive_every_period() {
        let start = Instant::now();
        let at = std::cell::RefCell::new(Vec::new());
        let wait = tokio::time::sleep(Duration::from_millis(600));
        holding(wait, || async {
            at.borrow_mut().push(start.elapsed().as_millis())
        })
        .await;
        let every = PROGRESS_EVERY.as_millis();
        let expected: Vec<u128> = (1..).map(|n| n * every).take_while(|t| *t < 600).collect();
        assert!(!expected.is_empty());
        assert_eq!(*at.borrow(), expected);
    }

    #[test]
    fn a_stage_timeout_is_the_limit() {
        let t = Some(Duration::from_millis(500));
        assert_eq!(hang_limit(t, [Some(NOW + 60_000)], NOW), t);
        assert_eq!(hang_limit(t, [None], NOW), t);
    }

    #[test]
    fn without_a_timeout_the_latest_deadline_bounds_the_batch() {
        let limit = hang_limit(None, [Some(NOW + 2_000), None, Some(NOW + 3_000)], NOW);
        assert_eq!(limit, Some(Duration::from_millis(3_000) + HANG_GRACE));
        let past = hang_limit(None, [Some(NOW - 5)], NOW);
        assert_eq!(past, Some(HANG_GRACE));
    }

    #[test]
    fn without_a_timeout_or_any_deadline_nothing_bounds_the_batch() {
        assert_eq!(hang_limit(None, [None, None], NOW), None);
        assert_eq!(hang_limit(None, [], NOW), None);
    }
}
