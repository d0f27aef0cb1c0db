//! natserve's worker agent, one per host: spawns and supervises the local Python worker
//! processes, runs a scheduler per hosted stage, and registers itself in NATS.
//!
//! Shutdown drains in a fixed order: deregister (ingresses stop counting on us), stop
//! pulling, let running batches finish and ack (up to the grace period), stop the
//! workers, flush NATS. Every step that needs NATS is bounded, so an unreachable server
//! cannot hold the exit: the agent is gone within `--agent-grace-ms` plus
//! [`DRAIN_MARGIN`], plus however long its worker processes take to exit on SIGTERM
//! (natserve's own: at once; one that ignores it is killed after 5 s).

#![deny(unsafe_code)]

pub mod config;
mod http;
pub mod registration;
mod supervisor;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::StorageType;
use natserve_protocol::nats::settled;
use natserve_protocol::{AgentConfig, Names, Results, StageSpec};
use natserve_scheduler::places::Places;
use natserve_scheduler::stage::StageContext;
use natserve_scheduler::{
    ensure_stage, run_stage, AgentMetrics, Cancellations, LocalStages, WorkerPool,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{AgentSettings, Args};
use registration::{Registration, RegistrationError};
use supervisor::{supervise, Slot};

/// In a fresh cluster the NATS server may still be starting: the first connect retries.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// Deleting the agent's record at shutdown; past it, the record expires on its own.
const DEREGISTER_WITHIN: Duration = Duration::from_millis(800);
/// Pull loops finish the pull in flight (at most one idle poll) and stop; past it,
/// stuck on a server that does not answer, they are left to the exit.
const PULLS_STOP_WITHIN: Duration = Duration::from_millis(1200);
/// The final flush of what the agent published (acks, replies).
const FLUSH_WITHIN: Duration = Duration::from_millis(500);
/// What a shutdown may take beyond the grace period, apart from worker processes
/// exiting: the three bounded NATS steps above, 2.5 s. With the supervisor's 5 s for a
/// worker that ignores SIGTERM it stays within the launcher's budget for the agent
/// (grace + 5 s + 3 s, `python-worker/natserve/_launcher.py`).
pub const DRAIN_MARGIN: Duration = Duration::from_millis(
    (DEREGISTER_WITHIN.as_millis() + PULLS_STOP_WITHIN.as_millis() + FLUSH_WITHIN.as_millis())
        as u64,
);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] natserve_protocol::ConfigError),
    #[error(transparent)]
    Name(#[from] natserve_protocol::NameError),
    #[error(transparent)]
    Connect(#[from] natserve_protocol::nats::ConnectError),
    #[error(transparent)]
    Stage(#[from] natserve_scheduler::StageError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error(transparent)]
    Bucket(#[from] natserve_protocol::buckets::BucketError),
    #[error(transparent)]
    NotClustered(#[from] natserve_protocol::replicas::NotClustered),
    #[error("socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot subscribe to cancellations: {0}")]
    Subscribe(async_nats::SubscribeError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("metrics address: {0}")]
    Bind(std::io::Error),
}

impl AgentError {
    /// Whether the error is NATS's answer of the moment (a timeout, a stream without a
    /// leader yet), which retrying may get past, rather than a setting or a route clash.
    fn may_pass(&self) -> bool {
        matches!(
            self,
            AgentError::Stage(natserve_scheduler::StageError::Stream { .. })
                | AgentError::Bucket(_)
                | AgentError::Registration(RegistrationError::Bucket(_))
                | AgentError::Registration(RegistrationError::Read(_))
        )
    }
}

/// Removes the socket directory the agent created, however `run` ends.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

fn socket_dir(settings: &AgentSettings) -> Result<(PathBuf, TempDir), AgentError> {
    let (path, owned) = match &settings.socket_dir {
        Some(p) => (p.clone(), false),
        None => {
            let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
            let p = std::env::temp_dir().join(format!("natserve-{}-{unique}", std::process::id()));
            (p, true)
        }
    };
    std::fs::create_dir_all(&path).map_err(|source| AgentError::SocketDir {
        path: path.clone(),
        source,
    })?;
    let guard = TempDir(owned.then(|| path.clone()));
    Ok((path, guard))
}

/// Runs the agent for `config`'s stages until `shutdown` resolves, then drains.
pub async fn run(
    settings: AgentSettings,
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    config.validate()?;
    let names = Names::new(&settings.namespace)?;
    let identity = natserve_protocol::nats::Identity {
        name: "natserve-agent".to_owned(),
        inbox_prefix: names.inbox_prefix("agent"),
    };
    let client = natserve_protocol::nats::connect(
        &settings.nats,
        &settings.nats_security,
        &identity,
        CONNECT_WITHIN,
    )
    .await?;
    natserve_protocol::replicas::check_cluster(&client, settings.queue.replicas)?;
    let js = jetstream::new(client.clone());
    let (dir, _dir_guard) = socket_dir(&settings)?;
    let registry = prometheus::Registry::new();
    let metrics = AgentMetrics::register(&registry)?;

    // Check the routes before anything else: an agent whose route collides with a live
    // one's must not create or pull from the queue they would share.
    let pools: Vec<WorkerPool> = config.stages.iter().map(|_| WorkerPool::new()).collect();
    // One load per place: a stage shared by several routes serves each of them.
    let loads: Vec<_> = config
        .stages
        .iter()
        .zip(&pools)
        .flat_map(|(spec, pool)| {
            config.places(spec).into_iter().map(|place| {
                let at = StageSpec {
                    route: place.at.route,
                    stage: place.at.stage,
                    ..spec.clone()
                };
                (at, pool.stats().clone())
            })
        })
        .collect();
    let replicas = settings.queue.replicas;
    // Queues that outlive the broker ask for replies that do too (the results bucket).
    let durable_replies = settings.queue.storage == StorageType::File || replicas > 1;
    let registration = settled("registration", AgentError::may_pass, || async {
        let registration = Registration::open(
            &js,
            &names,
            replicas,
            settings.heartbeat,
            &config.routes,
            loads.clone(),
            durable_replies,
        )
        .await?;
        registration.check_routes().await?;
        Ok(Arc::new(registration))
    })
    .await?;

    let results = settled("results bucket", AgentError::may_pass, || async {
        Ok(Results::open(&js, &names, replicas).await?)
    })
    .await?;
    let cancelled = Arc::new(Cancellations::default());
    let _cancel_follower = cancelled
        .clone()
        .follow(&client, names.cancel_subject())
        .await
        .map_err(AgentError::Subscribe)?;
    let draining = CancellationToken::new();
    let stop_workers = CancellationToken::new();
    let pullers = TaskTracker::new();
    let batches = TaskTracker::new();
    let supervisors = TaskTracker::new();
    let worker_cmd = Arc::new(config.worker_cmd.clone());
    let locals = Arc::new(LocalStages::new(settings.local_handoffs));
    for (spec, pool) in config.stages.iter().zip(pools) {
        let places = Places::new(&names, &config.places(spec))?;
        let consumer = settled("stage queue", AgentError::may_pass, || async {
            Ok(ensure_stage(&js, &names, spec, &places, &settings.queue).await?)
        })
        .await?;
        let stages_in_route = config.route(&spec.route).expect("validated").names.len() as u32;
        let slug = natserve_protocol::route_slug(&spec.route)?;
        let shared = Arc::new(spec.clone());
        for worker_id in 1..=spec.num.get() {
            let slot = Slot {
                spec: shared.clone(),
                stages_in_route,
                worker_id,
                worker_cmd: worker_cmd.clone(),
                socket: dir.join(format!("{slug}-{}-{worker_id}.sock", spec.stage)),
                pool: pool.sender(),
                log_format: settings.log_format,
                changed: registration.workers_changed(),
            };
            supervisors.spawn(supervise(slot, draining.clone(), stop_workers.clone()));
        }
        let ctx = StageContext::new(
            spec.clone(),
            places,
            &names,
            settings.queue.clone(),
            client.clone(),
            results.clone(),
            metrics.stage(&spec.route, spec.stage),
            locals.clone(),
        )?
        .with_prefetch(settings.prefetch)
        .with_cancellations(cancelled.clone());
        let ctx = Arc::new(ctx);
        locals.host(&ctx, pool.stats().clone());
        pullers.spawn(run_stage(
            ctx,
            consumer,
            pool,
            draining.clone(),
            batches.clone(),
        ));
        info!(route = %spec.route, stage = spec.stage, name = %spec.name, workers = spec.num.get(), "stage hosted");
    }

    info!(agent = registration.id(), "agent registered");
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = tokio::spawn({
        let registration = registration.clone();
        let cancel = stop_heartbeat.clone();
        async move { registration.heartbeat_until(cancel).await }
    });
    if let Some(addr) = settings.metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(AgentError::Bind)?;
        info!(address = %addr, "serving agent metrics");
        tokio::spawn(http::serve(
            listener,
            registry,
            registration.clone(),
            draining.clone(),
        ));
    }

    shutdown.await;
    info!("draining");
    stop_heartbeat.cancel();
    let mut heartbeat = heartbeat;
    if tokio::time::timeout(DEREGISTER_WITHIN, &mut heartbeat)
        .await
        .is_err()
    {
        warn!("deregistration did not finish in time; the record expires on its own");
        heartbeat.abort();
    }
    draining.cancel();
    pullers.close();
    if tokio::time::timeout(PULLS_STOP_WITHIN, pullers.wait())
        .await
        .is_err()
    {
        warn!("a pull did not end in time (nats unreachable?); stopping anyway");
    }
    batches.close();
    if tokio::time::timeout(settings.grace, batches.wait())
        .await
        .is_err()
    {
        warn!(
            grace_ms = settings.grace.as_millis() as u64,
            "batches still running after the grace period; stopping workers anyway"
        );
    }
    stop_workers.cancel();
    supervisors.close();
    supervisors.wait().await;
    match tokio::time::timeout(FLUSH_WITHIN, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "final flush failed"),
        Err(_) => warn!("final flush did not finish in time (nats unreachable?)"),
    }
    info!("agent stopped");
    Ok(())
}
