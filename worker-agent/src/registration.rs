//! The agent's presence in NATS: its routes in `<ns>_routes`, itself in `<ns>_agents`
//! refreshed every heartbeat and at once whenever a worker comes up or goes away (so an
//! ingress counts a stage's first worker as soon as it is ready, not a heartbeat later),
//! and its record deleted when it stops cleanly.
//!
//! Routes are keyed by slug, and two routes can share one (`/a/b` and `/a_b`): they would
//! share a queue. An agent refuses to start on a slug whose record names another route
//! while a live agent still serves that route; a record nobody serves is stale and is
//! overwritten.
//!
//! A NATS server with memory storage restarts empty: a heartbeat that fails reopens (so
//! creates) both buckets and writes the routes again, and every heartbeat puts back a
//! route record found missing, so ingresses see the routes again within one heartbeat.
//!
//! A heartbeat that does not land is tried again every [`BEAT_RETRY`] until one does, each
//! try bounded by [`WRITE_WITHIN`]: while a JetStream cluster elects a new leader for the
//! agents bucket no write lands and no question is answered, and the record must be
//! written again as soon as one is elected, not a request timeout or a heartbeat later.
//! (Ingresses do not count the silence of an outage against an agent; they do count what
//! follows it.)

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use natserve_protocol::buckets::{
    agents_bucket_config, open_bucket, routes_bucket_config, BucketError, ROUTE_REFRESH,
};
use natserve_protocol::{
    unix_ms, AgentRecord, Names, RouteRecord, RouteSpec, StageLoad, StageSpec,
};
use natserve_scheduler::WorkerStats;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long one write to a bucket (a heartbeat, a route record), one read of it, or one
/// reopening of it may take before it counts as failed.
pub const WRITE_WITHIN: Duration = Duration::from_secs(1);
/// Pause between tries of a heartbeat that did not land.
pub const BEAT_RETRY: Duration = Duration::from_millis(250);
/// Least time between two reopenings of the buckets while heartbeats keep failing: a
/// bucket without a leader is not gone, and asking for it again answers nothing.
const REOPEN_EVERY: Duration = Duration::from_secs(2);

/// Awaits `op` for at most [`WRITE_WITHIN`]; its error, or the timeout, as text.
async fn within<T, E: std::fmt::Display>(
    op: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(WRITE_WITHIN, op).await {
        Ok(done) => done.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", WRITE_WITHIN.as_millis())),
    }
}

/// Runs `attempt` until one try succeeds, pausing [`BEAT_RETRY`] after each failure;
/// `attempt` is told how many tries failed before it, and bounds each of its steps.
/// The number of failed tries once one succeeded; `None` when `cancel` fired first.
async fn until_landed<Fut>(
    cancel: &CancellationToken,
    mut attempt: impl FnMut(u32) -> Fut,
) -> Option<u32>
where
    Fut: Future<Output = Result<(), String>>,
{
    let mut failed = 0u32;
    loop {
        if cancel.is_cancelled() {
            return None;
        }
        let Err(error) = attempt(failed).await else {
            return Some(failed);
        };
        failed += 1;
        if failed == 1 {
            warn!(error = %error, retry_ms = BEAT_RETRY.as_millis() as u64, "heartbeat failed; trying again until it lands");
        } else {
            tracing::debug!(error = %error, tries = failed, "heartbeat failed again");
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(BEAT_RETRY) => {}
        }
    }
}

/// How many heartbeats apart the routes are rewritten: about every [`ROUTE_REFRESH`]
/// whatever the heartbeat, so an ingress's abandoned-route clock means the same everywhere.
fn routes_every(heartbeat: std::time::Duration) -> u32 {
    let beats = ROUTE_REFRESH.as_millis() / heartbeat.as_millis().max(1);
    u32::try_from(beats).unwrap_or(u32::MAX).max(1)
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    Bucket(#[from] BucketError),
    #[error(
        "route {route} maps to the NATS name {slug:?}, which route {other} uses and a live \
         agent ({agent}) serves: the two would share one queue; rename one of them"
    )]
    RouteTaken {
        route: String,
        other: String,
        slug: String,
        agent: String,
    },
    #[error("cannot read the routes or agents bucket: {0}")]
    Read(String),
}

pub struct Registration {
    js: jetstream::Context,
    names: Names,
    /// Copies each bucket is kept in, when it has to be made again.
    replicas: usize,
    agents: kv::Store,
    routes: kv::Store,
    key: String,
    host: String,
    heartbeat: Duration,
    route_records: Vec<(String, RouteRecord)>,
    stages: Vec<(StageSpec, Arc<WorkerStats>)>,
    workers_changed: Arc<Notify>,
}

impl Registration {
    pub async fn open(
        js: &jetstream::Context,
        names: &Names,
        replicas: usize,
        heartbeat: Duration,
        routes: &[RouteSpec],
        stages: Vec<(StageSpec, Arc<WorkerStats>)>,
        durable_replies: bool,
    ) -> Result<Self, RegistrationError> {
        let agents = open_bucket(js, agents_bucket_config(names, replicas)).await?;
        let routes_kv = open_bucket(js, routes_bucket_config(names, replicas)).await?;
        let host = hostname();
        let key = format!(
            "{}-{}-{}",
            sanitize(&host),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let route_records = routes
            .iter()
            .filter(|r| stages.iter().any(|(s, _)| s.route == r.route))
            .map(|r| {
                let slug = natserve_protocol::route_slug(&r.route).unwrap_or_default();
                let record = RouteRecord {
                    route: r.route.clone(),
                    stages: r.names.len() as u32,
                    names: r.names.clone(),
                    types: r.types.clone(),
                    streams: r.streams,
                    durable_replies,
                    queues: r.queues.clone(),
                };
                (slug, record)
            })
            .collect();
        Ok(Self {
            js: js.clone(),
            names: names.clone(),
            replicas,
            agents,
            routes: routes_kv,
            key,
            host,
            heartbeat,
            route_records,
            stages,
            workers_changed: Arc::new(Notify::new()),
        })
    }

    pub fn id(&self) -> &str {
        &self.key
    }

    /// What a supervisor notifies when one of its workers became ready or went away: the
    /// heartbeat loop then publishes the record without waiting for its next tick. Changes
    /// that come while a beat is being written are coalesced into the next one.
    pub fn workers_changed(&self) -> Arc<Notify> {
        self.workers_changed.clone()
    }

    pub fn record(&self) -> AgentRecord {
        AgentRecord {
            id: self.key.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            stages: self
                .stages
                .iter()
                .map(|(spec, stats)| StageLoad {
                    route: spec.route.clone(),
                    stage: spec.stage,
                    name: spec.name.clone(),
                    workers: spec.num.get(),
                    ready: stats.ready(),
                    free: stats.free(),
                })
                .collect(),
        }
    }

    /// Every hosted stage has at least one ready worker.
    pub fn is_ready(&self) -> bool {
        self.stages.iter().all(|(_, stats)| stats.ready() > 0)
    }

    /// Checks that no live agent serves another route under one of our slugs; the first
    /// heartbeat then writes our route records. A check, then a put: two agents starting
    /// in the same instant with colliding routes can both pass; every later one is refused.
    pub async fn check_routes(&self) -> Result<(), RegistrationError> {
        for (slug, ours) in &self.route_records {
            let entry = self
                .routes
                .entry(slug)
                .await
                .map_err(|e| RegistrationError::Read(e.to_string()))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue;
            };
            let Ok(theirs) = serde_json::from_slice::<RouteRecord>(&entry.value) else {
                continue; // unreadable: ours replaces it
            };
            if theirs.route == ours.route {
                continue;
            }
            if let Some(agent) = self.live_agent_serving(&theirs.route).await? {
                return Err(RegistrationError::RouteTaken {
                    route: ours.route.clone(),
                    other: theirs.route,
                    slug: slug.clone(),
                    agent,
                });
            }
            warn!(route = %ours.route, stale = %theirs.route, slug = %slug, "replacing a stale route record no live agent serves");
        }
        Ok(())
    }

    /// The id of an agent whose heartbeat is fresh (three beats, as every reader counts)
    /// and that hosts a stage of `route`.
    async fn live_agent_serving(&self, route: &str) -> Result<Option<String>, RegistrationError> {
        let read = |e: &dyn std::fmt::Display| RegistrationError::Read(e.to_string());
        let keys: Vec<String> = self
            .agents
            .keys()
            .await
            .map_err(|e| read(&e))?
            .try_collect()
            .await
            .map_err(|e| read(&e))?;
        let now_ms = unix_ms() as i128;
        for key in keys {
            let Some(entry) = self.agents.entry(&key).await.map_err(|e| read(&e))? else {
                continue;
            };
            let Ok(agent) = serde_json::from_slice::<AgentRecord>(&entry.value) else {
                continue;
            };
            let age_ms = now_ms - entry.created.unix_timestamp_nanos() / 1_000_000;
            let fresh = age_ms <= 3 * i128::from(agent.heartbeat_ms);
            if entry.operation == kv::Operation::Put
                && fresh
                && agent.stages.iter().any(|s| s.route == route)
            {
                return Ok(Some(agent.id));
            }
        }
        Ok(None)
    }

    /// Writes every route record; false if one did not land.
    async fn put_routes(&self) -> bool {
        let mut all = true;
        for (slug, record) in &self.route_records {
            let value = serde_json::to_vec(record).expect("route record serializes");
            if let Err(e) = within(self.routes.put(slug, value.into())).await {
                warn!(route = %record.route, error = %e, "route registration failed");
                all = false;
            }
        }
        all
    }

    async fn beat(&self) -> Result<(), kv::PutError> {
        let value = serde_json::to_vec(&self.record()).expect("agent record serializes");
        self.agents.put(&self.key, value.into()).await.map(|_| ())
    }

    /// Whether one of our route records is gone (a restarted server, an operator's
    /// delete). A read that fails counts as gone: the put that follows says why.
    async fn routes_missing(&self) -> bool {
        for (slug, _) in &self.route_records {
            match within(self.routes.entry(slug)).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {}
                _ => return true,
            }
        }
        false
    }

    /// Creates the buckets again where they are gone; the stores we hold name them, so
    /// they work again once the buckets exist.
    async fn reopen_buckets(&self) {
        for config in [
            agents_bucket_config(&self.names, self.replicas),
            routes_bucket_config(&self.names, self.replicas),
        ] {
            if let Err(e) = within(open_bucket(&self.js, config)).await {
                warn!(error = %e, "cannot reopen a kv bucket");
            }
        }
    }

    /// Publishes the record every heartbeat, and whenever a worker came up or went away,
    /// until `cancel` fires, then deletes it.
    pub async fn heartbeat_until(&self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.heartbeat);
        // A beat that waited out an outage is not followed by a burst of catch-up beats.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.workers_changed.notified() => {}
            }
            let routes_due = beats.is_multiple_of(routes_every(self.heartbeat));
            beats = beats.wrapping_add(1);
            if !self.beat_until_landed(routes_due, &cancel).await {
                break;
            }
        }
        if let Err(e) = self.agents.delete(&self.key).await {
            warn!(error = %e, "deregistration failed; the record expires on its own");
        }
    }

    /// One heartbeat, tried again every [`BEAT_RETRY`] until it lands; the routes go
    /// first when `routes_due`, when one is missing, or after the buckets were reopened.
    /// False when `cancel` fired first.
    async fn beat_until_landed(&self, routes_due: bool, cancel: &CancellationToken) -> bool {
        let started = Instant::now();
        let routes_due = AtomicBool::new(routes_due);
        let mut reopened: Option<Instant> = None;
        let attempt = |failed: u32| {
            // A bucket lost with a server that kept its store in memory must be made
            // again; one whose cluster is electing a leader only needs time, and asking
            // for it answers nothing: reopen after the first failure, then now and then.
            let now = Instant::now();
            let reopen = failed > 0 && reopened.is_none_or(|at| now - at >= REOPEN_EVERY);
            if reopen {
                reopened = Some(now);
            }
            let routes_due = &routes_due;
            async move {
                if reopen {
                    self.reopen_buckets().await;
                }
                if reopen || routes_due.load(Relaxed) || self.routes_missing().await {
                    routes_due.store(!self.put_routes().await, Relaxed);
                }
                within(self.beat()).await
            }
        };
        match until_landed(cancel, attempt).await {
            None => false,
            Some(0) => true,
            Some(failed) => {
                info!(
                    tries = failed + 1,
                    outage_ms = started.elapsed().as_millis() as u64,
                    "heartbeat landed again"
                );
                true
            }
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// KV keys allow letters, digits and `-_=./`; anything else in a hostname becomes `-`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_that_fails_is_tried_again_promptly_each_try_bounded() {
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let told = std::sync::Mutex::new(Vec::new());
        // Two writes nobody answers (a bucket without a leader), one refused at once,
        // then one that lands.
        let failed = until_landed(&cancel, |failed| {
            told.lock().unwrap().push(failed);
            async move {
                match failed {
                    0 | 1 => within(std::future::pending::<Result<(), String>>()).await,
                    2 => Err("no responders".to_owned()),
                    _ => Ok(()),
                }
            }
        })
        .await;
        assert_eq!(failed, Some(3));
        assert_eq!(*told.lock().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(start.elapsed(), 2 * WRITE_WITHIN + 3 * BEAT_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn tries_stop_when_cancelled() {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let failed = until_landed(&cancel, |failed| {
            if failed == 3 {
                stop.cancel();
            }
            async { Err::<(), _>("down".to_owned()) }
        })
        .await;
        assert_eq!(failed, None);
    }

    #[test]
    fn routes_are_rewritten_about_every_route_refresh_whatever_the_heartbeat() {
        use std::time::Duration;
        assert_eq!(routes_every(Duration::from_secs(2)), 15);
        assert_eq!(routes_every(Duration::from_millis(100)), 300);
        assert_eq!(routes_every(Duration::from_secs(60)), 1);
    }

    #[test]
    fn hostnames_become_valid_keys() {
        assert_eq!(sanitize("gpu-1.example.com"), "gpu-1-example-com");
        assert_eq!(sanitize("ünï"), "-n-");
    }
}
