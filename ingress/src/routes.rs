//! The route table: which routes exist (from `<ns>_routes`) and which agents are alive to
//! serve their stages (from `<ns>_agents`).
//!
//! The table is plain data updated by the KV watchers in [`crate::watch`]. Liveness uses
//! the local [`Instant`] an agent record was received, never the writer's clock: an agent
//! is live while its last record is younger than three of its heartbeats, counted on the
//! [`AgentClock`], which stands still while the agents bucket cannot be read or written
//! (see [`crate::liveness`]). A record received again unchanged (the same revision, as a
//! watch started anew replays it) is no new heartbeat.
//!
//! Route records are never deleted by agents (no agent knows it is a route's last), so a
//! route renamed or retired stays in the bucket. A route no live agent serves and whose
//! record no agent refreshed for [`ROUTE_ABANDONED_AFTER`] is abandoned: it no longer
//! counts against readiness and its path answers 404, until an agent registers it again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use natserve_protocol::buckets::ROUTE_ABANDONED_AFTER;
use natserve_protocol::{route_slug, AgentRecord, RouteRecord};

use crate::liveness::AgentClock;

/// Shared handle to the table: the watchers write, the handlers read.
pub type SharedRoutes = Arc<RwLock<RouteTable>>;

/// How many heartbeats an agent may miss before it counts as gone.
pub const MISSED_HEARTBEATS: u32 = 3;

#[derive(Debug, Clone)]
struct SeenAgent {
    record: AgentRecord,
    /// When it was received, on the [`AgentClock`].
    seen: Instant,
    /// The bucket's revision of the record, when it came from the bucket.
    revision: Option<u64>,
}

impl SeenAgent {
    /// `now` is on `clock`.
    fn is_live(&self, clock: &AgentClock, now: Instant) -> bool {
        let ttl = Duration::from_millis(self.record.heartbeat_ms) * MISSED_HEARTBEATS;
        now.saturating_duration_since(clock.heard(self.seen, ttl)) < ttl
    }
}

#[derive(Debug, Clone)]
struct SeenRoute {
    record: RouteRecord,
    /// When an agent last wrote the record (local clock).
    refreshed: Instant,
}

/// Routes by slug and agents by id, as last seen.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: HashMap<String, SeenRoute>,
    agents: HashMap<String, SeenAgent>,
    clock: AgentClock,
}

impl RouteTable {
    pub fn shared() -> SharedRoutes {
        Arc::new(RwLock::new(Self::default()))
    }

    /// Records a route as an agent wrote it at `refreshed`.
    pub fn put_route(&mut self, slug: &str, record: RouteRecord, refreshed: Instant) {
        self.routes
            .insert(slug.to_owned(), SeenRoute { record, refreshed });
    }

    pub fn remove_route(&mut self, slug: &str) {
        self.routes.remove(slug);
    }

    /// Records an agent heard at `seen`.
    pub fn put_agent(&mut self, id: &str, record: AgentRecord, seen: Instant) {
        let seen = self.clock.at(seen);
        self.agents.insert(
            id.to_owned(),
            SeenAgent {
                record,
                seen,
                revision: None,
            },
        );
    }

    /// Records revision `revision` of an agent's record, received at `received`: a
    /// heartbeat, unless it is the revision already held (a replay), which keeps the time
    /// it was first heard.
    pub fn put_agent_revision(
        &mut self,
        id: &str,
        record: AgentRecord,
        revision: u64,
        received: Instant,
    ) {
        let seen = match self.agents.get(id) {
            Some(held) if held.revision == Some(revision) => held.seen,
            _ => self.clock.at(received),
        };
        self.agents.insert(
            id.to_owned(),
            SeenAgent {
                record,
                seen,
                revision: Some(revision),
            },
        );
    }

    /// Marks proof, at `at`, that every agent record written so far was received and the
    /// bucket could take new ones (see [`crate::liveness`]).
    pub fn agents_caught_up(&mut self, at: Instant) {
        self.clock.caught_up(at);
    }

    /// How long the agents bucket has gone without such proof, as of `now`.
    pub fn agents_unproven_for(&self, now: Instant) -> Option<Duration> {
        self.clock.unproven_for(now)
    }

    pub fn remove_agent(&mut self, id: &str) {
        self.agents.remove(id);
    }

    /// Forgets agents that have been gone for a long while, so a churning cluster does
    /// not grow the table forever. Liveness does not depend on this.
    pub fn forget_dead_agents(&mut self, now: Instant) {
        let now = self.clock.at(now);
        self.agents.retain(|_, a| {
            let keep = Duration::from_millis(a.record.heartbeat_ms) * MISSED_HEARTBEATS * 10;
            now.saturating_duration_since(a.seen) < keep
        });
    }

    /// The route served at `path`, if any and not abandoned. Two paths can share a slug
    /// (`/a/b`, `/a_b`), so the record's own route must match too.
    pub fn lookup(&self, path: &str, now: Instant) -> Option<&RouteRecord> {
        let slug = route_slug(path).ok()?;
        self.routes
            .get(&slug)
            .filter(|r| r.record.route == path && !self.is_abandoned(r, now))
            .map(|r| &r.record)
    }

    /// Every route that is not abandoned, with its slug, sorted by route for stable output.
    pub fn routes(&self, now: Instant) -> Vec<(String, RouteRecord)> {
        let mut all: Vec<_> = self
            .routes
            .iter()
            .filter(|(_, r)| !self.is_abandoned(r, now))
            .map(|(slug, r)| (slug.clone(), r.record.clone()))
            .collect();
        all.sort_by(|a, b| a.1.route.cmp(&b.1.route));
        all
    }

    /// No live agent serves any stage of the route, and none refreshed its record for
    /// [`ROUTE_ABANDONED_AFTER`]. A live agent refreshes its routes well within that.
    fn is_abandoned(&self, route: &SeenRoute, now: Instant) -> bool {
        now.saturating_duration_since(route.refreshed) >= ROUTE_ABANDONED_AFTER
            && (0..route.record.stages).all(|i| !self.is_served(&route.record.route, i, now))
    }

    fn live_loads(
        &self,
        route: &str,
        stage: u32,
        now: Instant,
    ) -> impl Iterator<Item = &natserve_protocol::StageLoad> {
        let route = route.to_owned();
        let now = self.clock.at(now);
        self.agents
            .values()
            .filter(move |a| a.is_live(&self.clock, now))
            .flat_map(|a| a.record.stages.iter())
            .filter(move |s| s.route == route && s.stage == stage)
    }

    /// Whether some live agent hosts `stage` of `route` (its workers may still be warming up:
    /// the work waits in the queue).
    pub fn is_served(&self, route: &str, stage: u32, now: Instant) -> bool {
        self.live_loads(route, stage, now).next().is_some()
    }

    /// The first stage of `route` no live agent hosts, if any.
    pub fn first_unserved_stage(&self, record: &RouteRecord, now: Instant) -> Option<u32> {
        (0..record.stages).find(|&i| !self.is_served(&record.route, i, now))
    }

    /// Ready workers for `stage` of `route` across live agents.
    pub fn ready_workers(&self, route: &str, stage: u32, now: Instant) -> u64 {
        self.live_loads(route, stage, now)
            .map(|s| u64::from(s.ready))
            .sum()
    }

    /// `Ok` when there is at least one route and every stage of every route has a ready
    /// worker on a live agent; otherwise the first reason it is not ready.
    pub fn readiness(&self, now: Instant) -> Result<(), String> {
        let routes = self.routes(now);
        if routes.is_empty() {
            return Err("no routes registered".to_owned());
        }
        for (_, r) in &routes {
            if r.stages == 0 {
                return Err(format!("{} has no stages", r.route));
            }
            for i in 0..r.stages {
                if self.ready_workers(&r.route, i, now) == 0 {
                    return Err(format!("no ready worker for stage {i} of {}", r.route));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natserve_protocol::StageLoad;

    fn route(path: &str, stages: u32) -> RouteRecord {
        RouteRecord {
            route: path.into(),
            stages,
            names: vec![],
            types: None,
            streams: false,
            durable_replies: false,
            queues: Vec::new(),
        }
    }

    fn agent(id: &str, heartbeat_ms: u64, stages: &[(&str, u32, u32)]) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            host: "h".into(),
            pid: 1,
            heartbeat_ms,
            stages: stages
                .iter()
                .map(|&(route, stage, ready)| StageLoad {
                    route: route.into(),
                    stage,
                    name: "W".into(),
                    workers: ready.max(1),
                    ready,
                    free: ready,
                })
                .collect(),
        }
    }

    #[test]
    fn looks_up_routes_by_exact_path() {
        let now = Instant::now();
        let mut t = RouteTable::default();
        t.put_route("v1_embed", route("/v1/embed", 1), now);
        assert!(t.lookup("/v1/embed", now).is_some());
        assert!(
            t.lookup("/v1_embed", now).is_none(),
            "same slug, other path"
        );
        assert!(t.lookup("/nope", now).is_none());
        assert!(t.lookup("/bad path", now).is_none());
        t.put_route("v1_embed", route("/v1/embed", 2), now);
        assert_eq!(t.lookup("/v1/embed", now).unwrap().stages, 2);
        t.remove_route("v1_embed");
        assert!(t.lookup("/v1/embed", now).is_none());
    }

    #[test]
    fn an_agent_is_live_for_three_heartbeats_after_it_was_seen() {
        let t0 = Instant::now();
        let mut t = RouteTable::default();
        let r = route("/inference", 1);
        t.put_route("inference", r.clone(), t0);
        assert_eq!(t.first_unserved_stage(&r, t0), Some(0));

        t.put_agent("a", agent("a", 100, &[("/inference", 0, 1)]), t0);
        assert_eq!(t.first_unserved_stage(&r, t0), None);
        let just_alive = t0 + Duration::from_millis(299);
        assert_eq!(t.first_unserved_stage(&r, just_alive), None);
        let gone = t0 + Duration::from_millis(300);
        assert_eq!(t.first_unserved_stage(&r, gone), Some(0));

        // A fresh heartbeat brings it back.
        t.put_agent("a", agent("a", 100, &[("/inference", 0, 1)]), gone);
        assert_eq!(t.first_unserved_stage(&r, gone), None);

        t.remove_agent("a");
        assert_eq!(t.first_unserved_stage(&r, gone), Some(0));
    }

    #[test]
    fn every_stage_needs_a_live_agent() {
        let now = Instant::now();
        let mut t = RouteTable::default();
        let r = route("/pipe", 3);
        t.put_route("pipe", r.clone(), now);
        t.put_agent(
            "a",
            agent("a", 1000, &[("/pipe", 0, 1), ("/pipe", 2, 1)]),
            now,
        );
        assert_eq!(t.first_unserved_stage(&r, now), Some(1));
        t.put_agent("b", agent("b", 1000, &[("/pipe", 1, 0)]), now);
        assert_eq!(
            t.first_unserved_stage(&r, now),
            None,
            "warming up still serves"
        );
        assert!(!t.is_served("/other", 0, now));
    }

    #[test]
    fn ready_workers_sum_over_live_agents() {
        let now = Instant::now();
        let mut t = RouteTable::default();
        t.put_agent("a", agent("a", 1000, &[("/x", 0, 2)]), now);
        t.put_agent("b", agent("b", 1000, &[("/x", 0, 3), ("/x", 1, 1)]), now);
        let stale = now - Duration::from_secs(10);
        t.put_agent("c", agent("c", 1000, &[("/x", 0, 7)]), stale);
        assert_eq!(t.ready_workers("/x", 0, now), 5);
        assert_eq!(t.ready_workers("/x", 1, now), 1);
        assert_eq!(t.ready_workers("/x", 2, now), 0);
    }

    #[test]
    fn readiness_needs_a_route_and_a_ready_worker_per_stage() {
        let now = Instant::now();
        let mut t = RouteTable::default();
        assert_eq!(t.readiness(now), Err("no routes registered".into()));
        t.put_route("x", route("/x", 2), now);
        t.put_agent("a", agent("a", 1000, &[("/x", 0, 1), ("/x", 1, 0)]), now);
        assert_eq!(
            t.readiness(now),
            Err("no ready worker for stage 1 of /x".into())
        );
        t.put_agent("a", agent("a", 1000, &[("/x", 0, 1), ("/x", 1, 1)]), now);
        assert_eq!(t.readiness(now), Ok(()));
        t.put_route("y", route("/y", 1), now);
        assert_eq!(
            t.readiness(now),
            Err("no ready worker for stage 0 of /y".into())
        );
    }

    #[test]
    fn a_route_nobody_serves_or_refreshes_is_abandoned() {
        let t0 = Instant::now();
        let mut t = RouteTable::default();
        // A renamed route: the old record stays in the bucket, its agents are gone.
        t.put_route("a_b", route("/a_b", 1), t0);
        t.put_route("a", route("/a", 1), t0);
        let later = t0 + ROUTE_ABANDONED_AFTER;
        t.put_agent("n", agent("n", 1000, &[("/a", 0, 1)]), later);
        assert_eq!(
            t.readiness(t0),
            Err("no ready worker for stage 0 of /a_b".into()),
            "fresh: still expected to come up"
        );
        assert!(t.lookup("/a_b", t0).is_some());
        assert_eq!(t.readiness(later), Ok(()), "abandoned: no longer counted");
        assert!(t.lookup("/a_b", later).is_none(), "abandoned: 404");
        assert_eq!(t.routes(later).len(), 1);
        // A live agent keeps a route whose record is old; so does a fresh record.
        assert!(t.lookup("/a", later).is_some());
        t.put_route("a_b", route("/a_b", 1), later);
        assert!(t.lookup("/a_b", later).is_some());
    }

    #[test]
    fn forgets_long_dead_agents_only() {
        let now = Instant::now();
        let mut t = RouteTable::default();
        t.put_agent("old", agent("old", 100, &[("/x", 0, 1)]), now);
        t.put_agent(
            "new",
            agent("new", 100, &[("/x", 0, 1)]),
            now + Duration::from_secs(2),
        );
        t.forget_dead_agents(now + Duration::from_secs(3));
        assert!(!t.agents.contains_key("old"));
        assert!(t.agents.contains_key("new"));
    }

    #[test]
    fn an_agent_is_not_counted_gone_while_its_bucket_proves_nothing() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = RouteTable::default();
        t.agents_caught_up(t0);
        t.put_agent_revision("a", agent("a", 1000, &[("/x", 0, 1)]), 1, t0);
        // The bucket lost its leader right after: ten seconds without proof, far past
        // three heartbeats, and the agent still counts.
        assert!(t.is_served("/x", 0, t0 + 10 * s));
        // Proof again from 10 s on: its writes waited out the same outage, so it has
        // three whole heartbeats from there to be heard.
        for ms in (10_000..=13_000).step_by(500) {
            t.agents_caught_up(t0 + Duration::from_millis(ms));
        }
        assert!(t.is_served("/x", 0, t0 + Duration::from_millis(12_900)));
        assert!(
            !t.is_served("/x", 0, t0 + 13 * s),
            "gone three heartbeats after the proof"
        );
        // One already gone when the bucket lost its leader is not brought back by it.
        let mut t = RouteTable::default();
        t.agents_caught_up(t0);
        t.put_agent_revision("c", agent("c", 1000, &[("/x", 0, 1)]), 1, t0);
        for ms in (500..=3000).step_by(500) {
            t.agents_caught_up(t0 + Duration::from_millis(ms));
        }
        assert!(!t.is_served("/x", 0, t0 + 3 * s));
        for ms in (10_000..=11_000).step_by(500) {
            t.agents_caught_up(t0 + Duration::from_millis(ms));
        }
        assert!(!t.is_served("/x", 0, t0 + 10 * s));
        // With proof coming all along, an agent that stops is gone after three beats.
        let mut t = RouteTable::default();
        t.put_agent_revision("b", agent("b", 1000, &[("/x", 0, 1)]), 1, t0);
        for ms in (0..=4000).step_by(500) {
            t.agents_caught_up(t0 + Duration::from_millis(ms));
        }
        assert!(t.is_served("/x", 0, t0 + Duration::from_millis(2900)));
        assert!(!t.is_served("/x", 0, t0 + 3 * s));
    }
}
