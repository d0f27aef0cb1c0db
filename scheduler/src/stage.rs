//! One stage on one agent: its stream and consumer, what its batches share, and the pull
//! loops that keep its workers busy.
//!
//! A batch's walk: [`crate::pull`] takes an idle worker and pulls work for it,
//! [`crate::run`] runs it on that worker, [`crate::outbox`] sends each result where it
//! goes and acks.
//!
//! Lifecycle: the loops stop pulling when `cancel` fires (at most one idle poll later);
//! batches already running finish on their own tasks, tracked by the caller's
//! `TaskTracker`, and ack before they exit.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use natserve_protocol::streams::{
    work_consumer_config, work_stream_config, QueueConfig, PROGRESS_EVERY,
};
use natserve_protocol::{replicas, Names, Results, StageSpec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::envelopes::Envelopes;
use crate::handback::{keep_asking, Questions};
use crate::local::LocalStages;
use crate::lookahead::{Lookahead, Prefetch};
use crate::outbox::Outbox;
use crate::places::Places;
use crate::pool::WorkerPool;
use crate::pull::pull_loop;
use crate::{Cancellations, StageMetrics};

/// An idle stage renews its pull request this often; it bounds how long shutdown waits.
pub const IDLE_POLL: Duration = Duration::from_secs(1);

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

/// Creates (or updates the limits and raises the replicas of) the stage's work-queue
/// stream and its shared durable consumer. The stream binds the work subject of each of
/// the stage's `places`: one, or every route's place of a shared stage. Idempotent, so any number of agents may race
/// on it, and a stage calls it again whenever its pulls suggest the server lost them (see
/// [`StageContext::ensure_queue`]).
pub async fn ensure_stage(
    js: &jetstream::Context,
    names: &Names,
    spec: &StageSpec,
    places: &Places,
    queue: &QueueConfig,
) -> Result<jetstream::consumer::PullConsumer, StageError> {
    let slug = natserve_protocol::route_slug(&spec.route)?;
    let mut config = work_stream_config(names, &slug, spec.stage, queue);
    config.subjects = places.subjects().map(str::to_owned).collect();
    let name = config.name.clone();
    let err = |source: async_nats::Error| StageError::Stream {
        stream: name.clone(),
        source,
    };
    // `--replicas` is a floor: a stream another agent (or an operator) gave more copies
    // keeps them.
    if let Ok(existing) = js.get_stream(&name).await {
        let has = existing.cached_info().config.num_replicas;
        config.num_replicas = replicas::at_least(config.num_replicas, has);
    }
    js.create_or_update_stream(config)
        .await
        .map_err(|e| err(e.into()))?;
    let stream = js.get_stream(&name).await.map_err(|e| err(e.into()))?;
    // Create or update, so a consumer an older agent made takes today's ack wait.
    stream
        .create_consumer(work_consumer_config())
        .await
        .map_err(|e| err(e.into()))
}

/// Everything a batch needs to finish on its own task.
pub struct StageContext {
    pub spec: StageSpec,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub metrics: StageMetrics,
    pub outbox: Outbox,
    /// Whether to pull a worker's next batch while it runs the current one (see
    /// [`run_stage`]), and what that is decided from.
    pub lookahead: Lookahead,
    /// Queued requests whose client went away: dropped unrun.
    pub cancelled: Arc<Cancellations>,
    /// Work that came as envelopes, open until each letter is settled.
    pub envelopes: Arc<Envelopes>,
    /// When the stage may next ask whether another agent pulls (hand-backs).
    pub questions: Questions,
    /// The stage's work stream: what a letter handed on here by the stage before was
    /// never in.
    pub stream: String,
    names: Names,
    queue: QueueConfig,
}

impl StageContext {
    /// The context of stage `spec`, which serves `places` (its home first) on the agent
    /// whose stages are `locals`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: StageSpec,
        places: Places,
        names: &Names,
        queue: QueueConfig,
        client: async_nats::Client,
        results: Results,
        metrics: StageMetrics,
        locals: Arc<LocalStages>,
    ) -> Result<Self, StageError> {
        let outbox = Outbox::new(
            client.clone(),
            places,
            &spec,
            names.clone(),
            results,
            metrics.clone(),
            queue.replicas,
            locals,
        );
        let stream = names.stream_at(&natserve_protocol::StageAt {
            route: spec.route.clone(),
            stage: spec.stage,
        })?;
        Ok(Self {
            stream,
            js: jetstream::new(client.clone()),
            spec,
            client,
            metrics,
            envelopes: outbox.envelopes(),
            outbox,
            lookahead: Lookahead::new(Prefetch::Auto),
            cancelled: Arc::default(),
            questions: Questions::default(),
            names: names.clone(),
            queue,
        })
    }

    /// Creates the stage's stream and consumer again if they are gone: a NATS server with
    /// memory storage restarts empty, and nothing else would recreate them. True when
    /// they exist now.
    pub async fn ensure_queue(&self) -> bool {
        let places = self.outbox.places();
        match ensure_stage(&self.js, &self.names, &self.spec, places, &self.queue).await {
            Ok(_) => {
                info!(route = %self.spec.route, stage = self.spec.stage, "stage queue checked after a failed pull");
                true
            }
            Err(e) => {
                warn!(route = %self.spec.route, stage = self.spec.stage, error = %e, "cannot recreate the stage queue");
                false
            }
        }
    }

    pub fn with_cancellations(mut self, cancelled: Arc<Cancellations>) -> Self {
        self.cancelled = cancelled;
        self
    }

    pub fn with_prefetch(mut self, prefetch: Prefetch) -> Self {
        self.lookahead = Lookahead::new(prefetch);
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
/// With prefetch, a loop pulls its next batch first and then waits for an idle worker,
/// so the broker round trip overlaps the batch still running: an agent then holds at most
/// one batch per worker beyond what its workers are running. That buys throughput when a
/// round trip is a large share of a batch's time, at the cost of a slow agent keeping one
/// batch per worker that a faster one could have taken; by default ([`Prefetch::Auto`])
/// a stage does it only where its measurements say it pays ([`crate::lookahead`]).
pub async fn run_stage(
    ctx: Arc<StageContext>,
    consumer: jetstream::consumer::PullConsumer,
    pool: WorkerPool,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let pool = Arc::new(pool);
    let loops = (0..ctx.spec.num.get()).map(|_| {
        pull_loop(
            ctx.clone(),
            consumer.clone(),
            pool.clone(),
            cancel.clone(),
            tracker.clone(),
        )
    });
    // Letters that wait for a free worker stay theirs: `Progress` acks meanwhile.
    let keep_alive = {
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => ctx.envelopes.keep_waiting_alive().await,
                }
            }
        }
    };
    let asking = keep_asking(ctx.clone(), consumer.clone(), pool.clone(), cancel.clone());
    futures::future::join3(futures::future::join_all(loops), keep_alive, asking).await;
    debug!(route = %ctx.spec.route, stage = ctx.spec.stage, "stopped pulling");
}
