//! Keeps the [`RouteTable`] in step with the `<ns>_routes` and `<ns>_agents` KV buckets.
//!
//! Either the agent or the ingress may start first, so both open the buckets with
//! get-or-create. Each watcher replays the last value of every key, then follows changes;
//! if the watch fails or ends, the bucket is opened again — created, when a NATS server
//! that keeps its store in memory came back empty — and watched again, so an outage or a
//! broker restart heals by itself. Every question to the server is bounded by
//! [`ASK_WITHIN`], so a watcher tries again soon after a JetStream cluster elected a new
//! leader for the bucket, not a request timeout later.
//!
//! The agents watcher also proves, as often as [`PROBE_EVERY`], that it is caught up with
//! a bucket that can take writes (see [`crate::liveness`]): an entry the server sent with
//! nothing pending behind it, or a look at the bucket's stream that names a leader and no
//! message past the last one delivered. A watch that stays behind a led bucket without
//! moving for [`crate::liveness::STUCK_AFTER`] looks (its consumer died with a server) is started anew.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use natserve_protocol::buckets::open_bucket;
use natserve_protocol::{AgentRecord, RouteRecord};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::liveness::{look, Look, Progress, PROBE_EVERY};
use crate::routes::{RouteTable, SharedRoutes};

/// Applies one entry of the routes bucket, written by an agent at `refreshed`. Returns
/// false when the value was unusable.
pub fn apply_route_entry(
    table: &mut RouteTable,
    key: &str,
    operation: kv::Operation,
    value: &[u8],
    refreshed: Instant,
) -> bool {
    match operation {
        kv::Operation::Delete | kv::Operation::Purge => {
            table.remove_route(key);
            true
        }
        kv::Operation::Put => match serde_json::from_slice::<RouteRecord>(value) {
            Ok(record) => {
                table.put_route(key, record, refreshed);
                true
            }
            Err(e) => {
                warn!(key, error = %e, "ignoring route record that is not valid json");
                false
            }
        },
    }
}

/// Applies revision `revision` of one entry of the agents bucket, received at `now`.
pub fn apply_agent_entry(
    table: &mut RouteTable,
    key: &str,
    operation: kv::Operation,
    revision: u64,
    value: &[u8],
    now: Instant,
) -> bool {
    table.forget_dead_agents(now);
    match operation {
        kv::Operation::Delete | kv::Operation::Purge => {
            table.remove_agent(key);
            true
        }
        kv::Operation::Put => match serde_json::from_slice::<AgentRecord>(value) {
            Ok(record) => {
                if record.heartbeat_ms == 0 {
                    warn!(
                        key,
                        "agent record has heartbeat_ms 0; it never counts as live"
                    );
                }
                table.put_agent_revision(key, record, revision, now);
                true
            }
            Err(e) => {
                warn!(key, error = %e, "ignoring agent record that is not valid json");
                false
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
enum Bucket {
    Routes,
    Agents,
}

/// The running watchers of both buckets.
#[derive(Debug)]
pub struct Watchers {
    tasks: Vec<JoinHandle<()>>,
    loaded: Vec<oneshot::Receiver<()>>,
}

/// A bucket to follow: the store opened at start-up, and how to open it again.
#[derive(Debug)]
pub struct Followed {
    pub store: kv::Store,
    pub config: kv::Config,
}

/// Pause before watching a bucket again after its watch failed or ended.
const REWATCH_DELAY: Duration = Duration::from_secs(1);
/// How often a watcher asks whether its bucket is still the one it watches.
pub(crate) const BUCKET_CHECK: Duration = Duration::from_secs(2);
/// How long one question to the server about a bucket (open it, look at it, start a
/// watch) may take. A stream without a leader answers no question: a short bound lets
/// the watcher try again soon after one is elected, rather than a request timeout later.
pub(crate) const ASK_WITHIN: Duration = Duration::from_secs(2);
impl Watchers {
    /// Starts one watcher per bucket; they stop when `cancel` fires.
    pub fn spawn(
        js: jetstream::Context,
        routes: Followed,
        agents: Followed,
        table: SharedRoutes,
        cancel: CancellationToken,
    ) -> Self {
        let (routes_loaded, routes_rx) = oneshot::channel();
        let (agents_loaded, agents_rx) = oneshot::channel();
        let tasks = vec![
            tokio::spawn(follow(
                js.clone(),
                routes,
                Bucket::Routes,
                table.clone(),
                cancel.clone(),
                routes_loaded,
            )),
            tokio::spawn(follow(
                js,
                agents,
                Bucket::Agents,
                table,
                cancel,
                agents_loaded,
            )),
        ];
        Self {
            tasks,
            loaded: vec![routes_rx, agents_rx],
        }
    }

    /// Waits until both buckets' existing entries are in the table, or `within` passes,
    /// so a fresh ingress does not answer 404 for routes that exist. True when loaded.
    pub async fn loaded(&mut self, within: Duration) -> bool {
        let all = futures::future::join_all(self.loaded.iter_mut());
        matches!(tokio::time::timeout(within, all).await, Ok(r) if r.iter().all(Result::is_ok))
    }

    /// Waits for the watchers to stop (after their cancel token fired).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn follow(
    js: jetstream::Context,
    followed: Followed,
    which: Bucket,
    table: SharedRoutes,
    cancel: CancellationToken,
    loaded: oneshot::Sender<()>,
) {
    let Followed { mut store, config } = followed;
    let bucket = store.name.clone();
    // The store was opened just now, so its cached state says whether there is anything
    // to replay; if not, the (empty) table is already complete.
    let mut loaded = Some(loaded);
    if store.status().await.map(|s| s.values()).unwrap_or(1) == 0 {
        let _ = loaded.take().map(|tx| tx.send(()));
    }
    let agents = matches!(which, Bucket::Agents);
    let mut progress = Progress::default();
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(REWATCH_DELAY) => {}
            }
            // The bucket may be gone with the server that held it: make it again, so the
            // agents' next heartbeats have somewhere to land.
            match tokio::time::timeout(ASK_WITHIN, open_bucket(&js, config.clone())).await {
                Ok(Ok(reopened)) => store = reopened,
                Ok(Err(e)) => {
                    warn!(bucket, error = %e, "kv bucket cannot be opened, retrying");
                    continue;
                }
                Err(_) => {
                    warn!(bucket, "kv bucket cannot be opened in time, retrying");
                    continue;
                }
            }
        }
        // A watch does not notice its bucket vanish (a broker restart with memory
        // storage) or come back made anew by an agent: the bucket's creation time does.
        let watched = match look(&js, &bucket, ASK_WITHIN).await {
            Look::Found { created, .. } => created,
            Look::Missing | Look::Unanswered => continue,
        };
        let watch = tokio::select! {
            _ = cancel.cancelled() => return,
            w = tokio::time::timeout(ASK_WITHIN, store.watch_with_history(">")) => w,
        };
        let mut watch = match watch {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                warn!(bucket, error = %e, "kv watch failed to start, retrying");
                continue;
            }
            Err(_) => {
                warn!(bucket, "kv watch did not start in time, retrying");
                continue;
            }
        };
        // A new watch replays from the start: what it delivered so far proves nothing.
        progress.delivered = 0;
        progress.behind = None;
        let period = if agents { PROBE_EVERY } else { BUCKET_CHECK };
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checked = Instant::now();
        debug!(bucket, "watching kv bucket");
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = watch.next() => n,
                _ = check.tick() => {
                    let now = Instant::now();
                    if agents {
                        progress.note_outage(&table, &bucket, now);
                        if !progress.look_due(now, checked, BUCKET_CHECK) {
                            continue;
                        }
                    }
                    let seen = look(&js, &bucket, ASK_WITHIN).await;
                    match seen {
                        Look::Found { created, .. } if created == watched => checked = now,
                        Look::Found { .. } | Look::Missing => {
                            warn!(bucket, "kv bucket was lost or made anew, watching again");
                            break;
                        }
                        Look::Unanswered => continue, // unreachable now: nothing is proven
                    }
                    if !agents || !matches!(seen, Look::Found { led: true, .. }) {
                        continue;
                    }
                    if seen.proves_caught_up(progress.delivered) {
                        progress.prove(&table, &bucket, now);
                    } else if progress.stuck() {
                        warn!(bucket, delivered = progress.delivered, "kv watch is behind its bucket and delivers nothing, watching again");
                        break;
                    }
                    continue;
                }
            };
            let entry = match next {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    warn!(bucket, error = %e, "kv watch failed, watching again");
                    break;
                }
                None => {
                    warn!(bucket, "kv watch ended, watching again");
                    break;
                }
            };
            let received = Instant::now();
            {
                let mut table = table.write().unwrap_or_else(|p| p.into_inner());
                match which {
                    Bucket::Routes => apply_route_entry(
                        &mut table,
                        &entry.key,
                        entry.operation,
                        &entry.value,
                        written_at(entry.created),
                    ),
                    Bucket::Agents => apply_agent_entry(
                        &mut table,
                        &entry.key,
                        entry.operation,
                        entry.revision,
                        &entry.value,
                        received,
                    ),
                };
            }
            progress.delivered = progress.delivered.max(entry.revision);
            // The server had nothing more to send: caught up, as of its sending.
            if agents && entry.delta == 0 {
                progress.prove(&table, &bucket, received);
            }
            if entry.seen_current {
                let _ = loaded.take().map(|tx| tx.send(()));
            }
        }
    }
}

/// When the server stored an entry, on the local clock. Replayed history can be old: a
/// route record nobody refreshed since must not look fresh to an ingress that just started.
fn written_at(created: time::OffsetDateTime) -> Instant {
    let now = Instant::now();
    let age = (time::OffsetDateTime::now_utc() - created)
        .try_into()
        .unwrap_or(Duration::ZERO);
    now.checked_sub(age).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv::Operation;

    #[test]
    fn route_entries_put_replace_and_remove() {
        let now = Instant::now();
        let mut t = RouteTable::default();
        let v1 = br#"{"route": "/inference", "stages": 1, "names": ["A"]}"#;
        assert!(apply_route_entry(
            &mut t,
            "inference",
            Operation::Put,
            v1,
            now
        ));
        assert_eq!(t.lookup("/inference", now).unwrap().stages, 1);

        let v2 = br#"{"route": "/inference", "stages": 2}"#;
        assert!(apply_route_entry(
            &mut t,
            "inference",
            Operation::Put,
            v2,
            now
        ));
        assert_eq!(t.lookup("/inference", now).unwrap().stages, 2);

        assert!(!apply_route_entry(
            &mut t,
            "inference",
            Operation::Put,
            b"{",
            now
        ));
        assert_eq!(
            t.lookup("/inference", now).unwrap().stages,
            2,
            "bad json keeps the old"
        );

        assert!(apply_route_entry(
            &mut t,
            "inference",
            Operation::Delete,
            b"",
            now
        ));
        assert!(t.lookup("/inference", now).is_none());
        apply_route_entry(&mut t, "inference", Operation::Put, v1, now);
        apply_route_entry(&mut t, "inference", Operation::Purge, b"", now);
        assert!(t.lookup("/inference", now).is_none());
    }

    #[test]
    fn old_entries_are_dated_by_the_server() {
        let written = written_at(time::OffsetDateTime::now_utc() - Duration::from_secs(120));
        let age = Instant::now().saturating_duration_since(written);
        assert!(age >= Duration::from_secs(119), "{age:?}");
        let future = written_at(time::OffsetDateTime::now_utc() + Duration::from_secs(5));
        assert!(
            future <= Instant::now(),
            "clock skew never dates an entry ahead"
        );
    }

    #[test]
    fn agent_entries_count_from_their_receive_time() {
        let now = Instant::now();
        let mut t = RouteTable::default();
        let record = br#"{"id": "a", "host": "h", "pid": 1, "heartbeat_ms": 1000,
            "stages": [{"route": "/x", "stage": 0, "name": "W", "workers": 2, "ready": 2, "free": 1}]}"#;
        assert!(apply_agent_entry(
            &mut t,
            "a",
            Operation::Put,
            1,
            record,
            now
        ));
        assert_eq!(t.ready_workers("/x", 0, now), 2);
        assert_eq!(t.ready_workers("/x", 0, now + Duration::from_secs(3)), 0);

        assert!(!apply_agent_entry(
            &mut t,
            "b",
            Operation::Put,
            2,
            b"[]",
            now
        ));
        assert!(apply_agent_entry(
            &mut t,
            "a",
            Operation::Delete,
            3,
            b"",
            now
        ));
        assert_eq!(t.ready_workers("/x", 0, now), 0);
    }

    #[test]
    fn a_replayed_agent_record_is_no_new_heartbeat() {
        let t0 = Instant::now();
        let mut t = RouteTable::default();
        let record = br#"{"id": "a", "host": "h", "pid": 1, "heartbeat_ms": 1000,
            "stages": [{"route": "/x", "stage": 0, "name": "W", "workers": 1, "ready": 1, "free": 1}]}"#;
        apply_agent_entry(&mut t, "a", Operation::Put, 7, record, t0);
        // A watch started anew replays revision 7 two seconds later: still seen at t0.
        let replay = t0 + Duration::from_secs(2);
        apply_agent_entry(&mut t, "a", Operation::Put, 7, record, replay);
        assert_eq!(t.ready_workers("/x", 0, t0 + Duration::from_secs(3)), 0);
        // A new revision is a heartbeat.
        apply_agent_entry(&mut t, "a", Operation::Put, 8, record, replay);
        assert_eq!(t.ready_workers("/x", 0, t0 + Duration::from_secs(3)), 1);
    }
}
