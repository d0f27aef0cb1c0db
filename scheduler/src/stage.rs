//! One stage on one agent: its stream and consumer, and the loop that pulls work only
//! when a worker is idle, batches it, runs it, hands results on and acks.
//!
//! Lifecycle: the loop stops pulling when `cancel` fires (at most one idle poll later);
//! batches already running finish on their own tasks, tracked by the caller's
//! `TaskTracker`, and ack before they exit.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream, AckKind};
use bytes::Bytes;
use natserve_protocol::{unix_ms, Names, Outcome, CONSUMER};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use crate::batcher::{collect_batch, split_expired, Limits};
use crate::handoff::{self, append_batch_size, deadline_ms, handoff_headers, reply};
use crate::inbox::PullInbox;
use crate::pool::{PoolSender, WorkerConn, WorkerPool};
use crate::{Cancellations, StageMetrics, StageSpec};

/// How long a message may stay unacknowledged before JetStream redelivers it to another
/// agent. Long batches send `Progress` every third of it.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// Deliveries before JetStream gives up on a message whose agents keep dying.
pub const MAX_DELIVER: i64 = 3;
/// An idle stage renews its pull request this often; it bounds how long shutdown waits.
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// Without a stage timeout, a batch still running this long after its items' deadline
/// counts as hung: its worker is replaced.
pub const HANG_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("stream {stream}: {source}")]
    Stream {
        stream: String,
        source: async_nats::Error,
    },
    #[error(transparent)]
    Name(#[from] natserve_protocol::NameError),
}

/// Where the stage's queue lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max_messages: i64,
    pub storage: stream::StorageType,
}

/// Creates (or updates the limits of) the stage's work-queue stream and its shared
/// durable consumer. Idempotent, so any number of agents may race on it.
pub async fn ensure_stage(
    js: &jetstream::Context,
    names: &Names,
    spec: &StageSpec,
    queue: &QueueConfig,
) -> Result<jetstream::consumer::PullConsumer, StageError> {
    let slug = natserve_protocol::route_slug(&spec.route)?;
    let name = names.stream(&slug, spec.stage);
    let err = |source: async_nats::Error| StageError::Stream {
        stream: name.clone(),
        source,
    };
    js.create_or_update_stream(stream::Config {
        name: name.clone(),
        subjects: vec![names.work_subject(&slug, spec.stage)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: queue.storage,
        max_messages: queue.max_messages,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| err(e.into()))?;
    let stream = js.get_stream(&name).await.map_err(|e| err(e.into()))?;
    stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_deliver: MAX_DELIVER,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| err(e.into()))
}

/// Everything a batch needs to finish on its own task.
pub struct StageContext {
    pub spec: StageSpec,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub metrics: StageMetrics,
    /// Work subject of the next stage; `None` at the last stage.
    pub next_subject: Option<String>,
    /// Pull a worker's next batch while it runs the current one (see [`run_stage`]).
    pub prefetch: bool,
    /// Queued requests whose client went away: dropped unrun.
    pub cancelled: Arc<Cancellations>,
}

impl StageContext {
    pub fn new(
        spec: StageSpec,
        stages_in_route: u32,
        names: &Names,
        client: async_nats::Client,
        metrics: StageMetrics,
    ) -> Result<Self, StageError> {
        let slug = natserve_protocol::route_slug(&spec.route)?;
        let next_subject =
            (spec.stage + 1 < stages_in_route).then(|| names.work_subject(&slug, spec.stage + 1));
        Ok(Self {
            js: jetstream::new(client.clone()),
            spec,
            client,
            metrics,
            next_subject,
            prefetch: false,
            cancelled: Arc::default(),
        })
    }

    pub fn with_cancellations(mut self, cancelled: Arc<Cancellations>) -> Self {
        self.cancelled = cancelled;
        self
    }

    pub fn with_prefetch(mut self, prefetch: bool) -> Self {
        self.prefetch = prefetch;
        self
    }
}

/// Pulls and runs the stage's work until `cancel` fires. One idle worker is taken from the
/// pool per batch, so the agent never holds more work than its workers can start.
///
/// Each of the stage's worker processes gets its own pull loop (and pull inbox): a loop
/// holds an idle worker while its pull is in flight, so with several workers their pull
/// round trips overlap instead of queueing behind one another.
///
/// With `prefetch`, a loop pulls its next batch first and then waits for an idle worker,
/// so the broker round trip overlaps the batch still running: an agent then holds at most
/// one batch per worker beyond what its workers are running. That buys throughput when a
/// round trip is a large share of a batch's time, at the cost of a slow agent keeping one
/// batch per worker that a faster one could have taken.
pub async fn run_stage(
    ctx: Arc<StageContext>,
    consumer: jetstream::consumer::PullConsumer,
    pool: WorkerPool,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let returns = pool.sender();
    let pool = Arc::new(tokio::sync::Mutex::new(pool));
    let loops = (0..ctx.spec.num.max(1)).map(|_| {
        pull_loop(
            ctx.clone(),
            consumer.clone(),
            pool.clone(),
            returns.clone(),
            cancel.clone(),
            tracker.clone(),
        )
    });
    futures::future::join_all(loops).await;
    debug!(route = %ctx.spec.route, stage = ctx.spec.stage, "stopped pulling");
}

/// One pull loop: take an idle worker, pull a batch for it, start it, repeat.
async fn pull_loop(
    ctx: Arc<StageContext>,
    consumer: jetstream::consumer::PullConsumer,
    pool: Arc<tokio::sync::Mutex<WorkerPool>>,
    returns: PoolSender,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let limits = Limits {
        max_batch: ctx.spec.max_batch_size.max(1) as usize,
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
    loop {
        let (worker, batch) = if ctx.prefetch {
            let Some(batch) = pull(&ctx, &mut source, limits, &cancel).await else {
                break;
            };
            let Some(worker) = take(&pool, &cancel).await else {
                release(batch).await;
                break;
            };
            (worker, batch)
        } else {
            let Some(worker) = take(&pool, &cancel).await else {
                break;
            };
            let Some(batch) = pull(&ctx, &mut source, limits, &cancel).await else {
                returns.put(worker);
                break;
            };
            (worker, batch)
        };
        let (live, expired) = split_expired(batch, unix_ms(), deadline_ms);
        let (live, cancelled) = drop_cancelled(&ctx.cancelled, live);
        for msg in cancelled {
            // Nobody waits for an answer: terminate without one.
            ack(&msg, AckKind::Term).await;
        }
        for msg in expired {
            let body = format!(
                "deadline passed before stage {} of {} ran",
                ctx.spec.stage, ctx.spec.route
            );
            finish(&ctx, &msg, Outcome::Timeout, body.into(), None).await;
        }
        if live.is_empty() {
            returns.put(worker);
            continue;
        }
        tracker.spawn(run_batch(ctx.clone(), worker, live, returns.clone()));
    }
}

/// Splits off the messages whose request was cancelled by its ingress.
fn drop_cancelled(
    cancelled: &Cancellations,
    batch: Vec<jetstream::Message>,
) -> (Vec<jetstream::Message>, Vec<jetstream::Message>) {
    if cancelled.is_empty() {
        return (batch, Vec::new());
    }
    batch.into_iter().partition(|msg| {
        handoff::header(msg, natserve_protocol::headers::REQUEST_ID)
            .is_none_or(|id| !cancelled.contains(id))
    })
}

/// Waits for an idle worker; `None` once `cancel` fires or the pool is gone.
async fn take(
    pool: &tokio::sync::Mutex<WorkerPool>,
    cancel: &CancellationToken,
) -> Option<WorkerConn> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        worker = async { pool.lock().await.take().await } => worker,
    }
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

/// Hands back a prefetched batch no worker will run (shutdown): JetStream redelivers it
/// at once to another agent instead of after the ack wait.
async fn release(batch: Vec<jetstream::Message>) {
    for msg in batch {
        ack(&msg, AckKind::Nak(None)).await;
    }
}

/// How long a batch may run before its worker is considered hung.
fn hang_limit(spec: &StageSpec, msgs: &[jetstream::Message]) -> Duration {
    if let Some(limit) = spec.batch_timeout() {
        return limit;
    }
    let now = unix_ms();
    let latest = msgs.iter().filter_map(deadline_ms).max().unwrap_or(now);
    Duration::from_millis(latest.saturating_sub(now)) + HANG_GRACE
}

enum BatchEnd {
    Done(Vec<natserve_protocol::ItemResult>),
    Failed(String),
    Hung(Duration),
}

async fn run_batch(
    ctx: Arc<StageContext>,
    mut worker: WorkerConn,
    msgs: Vec<jetstream::Message>,
    returns: PoolSender,
) {
    let started = Instant::now();
    ctx.metrics.batch_size.observe(msgs.len() as f64);
    let payloads: Vec<Bytes> = msgs.iter().map(|m| m.payload.clone()).collect();
    let limit = hang_limit(&ctx.spec, &msgs);
    let end = {
        let run = worker.run(payloads);
        tokio::pin!(run);
        let mut progress = tokio::time::interval_at(started + ACK_WAIT / 3, ACK_WAIT / 3);
        let hang = tokio::time::sleep(limit);
        tokio::pin!(hang);
        loop {
            tokio::select! {
                result = &mut run => break match result {
                    Ok(results) => BatchEnd::Done(results),
                    Err(e) => BatchEnd::Failed(e.to_string()),
                },
                _ = progress.tick() => {
                    for msg in &msgs {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
                _ = &mut hang => break BatchEnd::Hung(limit),
            }
        }
    };
    ctx.metrics
        .batch_seconds
        .observe(started.elapsed().as_secs_f64());
    match end {
        BatchEnd::Done(results) => {
            // The worker is idle as soon as its results are in: it may pull its next batch
            // while this one's hand-offs and acks complete (each input is still acked only
            // after its result is safe).
            returns.put(worker);
            hand_on(&ctx, &msgs, results).await;
        }
        BatchEnd::Failed(reason) => {
            error!(worker = worker.label(), error = %reason, "worker failed a batch; replacing it");
            ctx.metrics.worker_failures.inc();
            drop(worker);
            let body = Bytes::from_static(
                b"internal error: worker process failed while running this request",
            );
            for msg in &msgs {
                finish(&ctx, msg, Outcome::ServerError, body.clone(), None).await;
            }
        }
        BatchEnd::Hung(limit) => {
            error!(
                worker = worker.label(),
                limit_ms = limit.as_millis() as u64,
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
            for msg in &msgs {
                finish(&ctx, msg, Outcome::Timeout, body.clone(), None).await;
            }
        }
    }
}

/// Sends every result where it belongs, then acks each input once its result is safe:
/// a hand-off only after JetStream acknowledged it.
async fn hand_on(
    ctx: &StageContext,
    msgs: &[jetstream::Message],
    results: Vec<natserve_protocol::ItemResult>,
) {
    let size = msgs.len();
    let mut handoffs = Vec::new();
    for (msg, result) in msgs.iter().zip(results) {
        let outcome = Outcome::from(result.status);
        ctx.metrics.count_item(outcome);
        let sizes = append_batch_size(
            handoff::header(msg, natserve_protocol::headers::BATCH_SIZES),
            size,
        );
        match (&ctx.next_subject, outcome) {
            (Some(next), Outcome::Ok) => {
                let headers = handoff_headers(msg, ctx.spec.stage + 1, &sizes);
                match ctx
                    .js
                    .publish_with_headers(next.clone(), headers, result.body)
                    .await
                {
                    Ok(ack) => handoffs.push((msg, ack, sizes)),
                    Err(e) => fail_handoff(ctx, msg, &e, &sizes).await,
                }
            }
            (_, outcome) => {
                reply(
                    &ctx.client,
                    msg,
                    outcome,
                    result.body,
                    Some(&sizes),
                    &ctx.spec.mime,
                )
                .await;
                ack(msg, AckKind::Ack).await;
            }
        }
    }
    for (msg, pub_ack, sizes) in handoffs {
        match pub_ack.await {
            Ok(_) => ack(msg, AckKind::Ack).await,
            Err(e) => fail_handoff(ctx, msg, &e, &sizes).await,
        }
    }
}

async fn fail_handoff(
    ctx: &StageContext,
    msg: &jetstream::Message,
    err: &jetstream::context::PublishError,
    sizes: &str,
) {
    let (outcome, text) = handoff::handoff_failure(err);
    warn!(route = %ctx.spec.route, stage = ctx.spec.stage, error = %err, "hand-off failed");
    finish(ctx, msg, outcome, Bytes::from(text), Some(sizes)).await;
}

/// Answers a request that will not go further and terminates its message.
async fn finish(
    ctx: &StageContext,
    msg: &jetstream::Message,
    outcome: Outcome,
    body: Bytes,
    sizes: Option<&str>,
) {
    ctx.metrics.count_item(outcome);
    reply(&ctx.client, msg, outcome, body, sizes, &ctx.spec.mime).await;
    ack(msg, AckKind::Term).await;
}

async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        warn!(error = %e, "ack failed; the message will be redelivered");
    }
}
