//! The clock agents' heartbeats are judged by: it runs only while this ingress knows it
//! sees everything written to the agents bucket.
//!
//! An agent that wrote no heartbeat for three of its periods is gone, if it could have
//! written one and this ingress could have seen it. While the agents bucket has no
//! leader (a JetStream cluster electing one after a node died), or this ingress's watch
//! of it is broken or behind, a heartbeat missing from the table proves nothing: no agent
//! can write, or the ingress cannot read. So the watcher marks each moment it has proof
//! that it is caught up with a bucket that has a leader ([`AgentClock::caught_up`]: an
//! entry the server sent with nothing pending behind it, or the bucket's stream info
//! naming a leader and no message the watch has not delivered), and agents' time runs
//! only up to [`GRACE`] past the last proof. When proof comes again, the time in
//! between, less the grace, is not counted, and an agent that was live when the clock
//! stopped has three whole heartbeats from then on to be heard again
//! ([`AgentClock::heard`]): its own writes waited out the same outage, and land some
//! retries after the bucket is back. A dead one is found gone three heartbeats after
//! the outage.
//!
//! The watcher's side of it lives here too: what a look at the bucket's stream says
//! ([`Look`]) and its account of what it delivered and proved ([`Progress`]).

use std::time::{Duration, Instant};

use async_nats::jetstream;
use tracing::{debug, info, warn};

use crate::routes::SharedRoutes;

/// How long agents' time runs on past the last proof. Proof comes at least every
/// [`PROBE_EVERY`] while the bucket is healthy, so a gap longer than this is an outage
/// (or a watch that fell behind).
pub const GRACE: Duration = Duration::from_secs(1);

/// Counted time: real time, less the outages of the agents bucket seen so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentClock {
    /// The last proof; `None` before the first, when time counts as it passes (a table
    /// nobody watches, filled by hand).
    proof: Option<Instant>,
    /// Time not counted: each gap between two proofs longer than [`GRACE`], less it.
    skipped: Duration,
    /// Where the counted clock stood still through the latest outage.
    resumed: Option<Instant>,
}

impl AgentClock {
    /// `now` on the counted clock, which stood still through every outage.
    pub fn at(&self, now: Instant) -> Instant {
        let until = match self.proof {
            Some(proof) => now.min(proof + GRACE),
            None => now,
        };
        until.checked_sub(self.skipped).unwrap_or(until)
    }

    /// Marks proof, at `at`, that everything written to the bucket was seen and that the
    /// bucket could take writes. Proof older than the last one changes nothing.
    pub fn caught_up(&mut self, at: Instant) {
        let gap = match self.proof {
            Some(proof) if at <= proof => return,
            Some(proof) => at.saturating_duration_since(proof + GRACE),
            None => Duration::ZERO,
        };
        self.skipped += gap;
        self.proof = Some(at);
        if !gap.is_zero() {
            self.resumed = Some(self.at(at));
        }
    }

    /// When an agent last heard at `seen` (on this clock) and allowed silence `ttl`
    /// counts as heard: at `seen`, or where the clock stood still through the latest
    /// outage if it was live then.
    pub fn heard(&self, seen: Instant, ttl: Duration) -> Instant {
        match self.resumed {
            Some(resumed) if seen + ttl > resumed => seen.max(resumed),
            _ => seen,
        }
    }

    /// How long real time has run without proof, as of `now`; `None` before the first.
    pub fn unproven_for(&self, now: Instant) -> Option<Duration> {
        self.proof.map(|p| now.saturating_duration_since(p))
    }
}

/// How often the agents watcher looks at its bucket when no entry proved it caught up
/// meanwhile (see [`crate::liveness`]): well within [`crate::liveness::GRACE`].
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Looks in a row that find the watch behind a bucket with a leader, delivering nothing,
/// before the watch is started anew (its consumer was lost with a server, say).
pub(crate) const STUCK_AFTER: u32 = 3;
/// How long without proof of the agents bucket before the watcher says so.
const OUTAGE_NOTE: Duration = Duration::from_secs(3);

/// What the server said of a bucket's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Look {
    /// It does not exist.
    Missing,
    /// No answer in time, or an error: nothing is known.
    Unanswered,
    Found {
        created: time::OffsetDateTime,
        /// A server leads it: it takes writes. A follower answers for a stream without
        /// a leader, naming none.
        led: bool,
        messages: u64,
        last_sequence: u64,
    },
}

impl Look {
    /// Whether a watch that delivered up to revision `delivered` has seen all of it,
    /// and the bucket can take writes.
    pub(crate) fn proves_caught_up(&self, delivered: u64) -> bool {
        matches!(*self, Look::Found { led: true, messages, last_sequence, .. }
            if messages == 0 || last_sequence <= delivered)
    }
}

/// Asks the server about bucket `bucket`'s stream, waiting at most `within`.
pub(crate) async fn look(js: &jetstream::Context, bucket: &str, within: Duration) -> Look {
    let asked = tokio::time::timeout(within, js.get_stream(format!("KV_{bucket}"))).await;
    match asked {
        Ok(Ok(stream)) => {
            let info = stream.cached_info();
            Look::Found {
                created: info.created,
                // A server outside a cluster names itself; a stream without a leader, none.
                led: info
                    .cluster
                    .as_ref()
                    .is_none_or(|c| c.leader.as_deref().is_some_and(|l| !l.is_empty())),
                messages: info.state.messages,
                last_sequence: info.state.last_sequence,
            }
        }
        Ok(Err(e)) if natserve_protocol::streams::is_missing(&e) => Look::Missing,
        Ok(Err(e)) => {
            debug!(bucket, error = %e, "cannot ask for the kv bucket");
            Look::Unanswered
        }
        Err(_) => {
            debug!(bucket, "no answer about the kv bucket in time");
            Look::Unanswered
        }
    }
}

/// The agents watcher's account of whether it is caught up with its bucket.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// The last revision this watch delivered.
    pub(crate) delivered: u64,
    /// When the last proof was marked.
    proved: Option<Instant>,
    /// `delivered` when a look first found the watch behind, and looks since.
    pub(crate) behind: Option<(u64, u32)>,
    /// The watcher said the bucket has gone unproven, and will say when it is back.
    noted: bool,
}

impl Progress {
    pub(crate) fn prove(&mut self, table: &SharedRoutes, bucket: &str, at: Instant) {
        self.behind = None;
        self.proved = Some(self.proved.map_or(at, |p| p.max(at)));
        let mut table = table.write().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut self.noted) {
            let outage = table.agents_unproven_for(at).unwrap_or_default();
            info!(
                bucket,
                outage_ms = outage.as_millis() as u64,
                "agents bucket caught up again; counting agents' heartbeats"
            );
        }
        table.agents_caught_up(at);
    }

    /// Whether a look is worth asking now: no proof came for a while, or the bucket's
    /// identity is due a check (every `check_every`, the last at `checked`).
    pub(crate) fn look_due(&self, now: Instant, checked: Instant, check_every: Duration) -> bool {
        self.proved
            .is_none_or(|p| now.saturating_duration_since(p) >= PROBE_EVERY)
            || now.saturating_duration_since(checked) >= check_every
    }

    /// A look found the watch behind a bucket that has a leader: whether it has stayed
    /// stuck there for [`STUCK_AFTER`] looks.
    pub(crate) fn stuck(&mut self) -> bool {
        let looks = match self.behind {
            Some((at, looks)) if at == self.delivered => looks + 1,
            _ => 1,
        };
        self.behind = Some((self.delivered, looks));
        looks >= STUCK_AFTER
    }

    pub(crate) fn note_outage(&mut self, table: &SharedRoutes, bucket: &str, now: Instant) {
        let unproven = table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .agents_unproven_for(now);
        if !self.noted && unproven.is_some_and(|d| d >= OUTAGE_NOTE) {
            self.noted = true;
            warn!(
                bucket,
                "cannot tell whether agents heartbeat (the agents bucket has no leader, or its watch is behind); their silence is not counted against them"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn without_any_proof_time_counts_as_it_passes() {
        let t0 = Instant::now();
        let clock = AgentClock::default();
        assert_eq!(clock.at(t0 + 10 * S) - clock.at(t0), 10 * S);
    }

    #[test]
    fn with_proof_coming_time_counts_as_it_passes() {
        let t0 = Instant::now();
        let mut clock = AgentClock::default();
        let seen = clock.at(t0);
        for i in 1..=20 {
            clock.caught_up(t0 + i * Duration::from_millis(500));
        }
        assert_eq!(clock.at(t0 + 10 * S) - seen, 10 * S);
    }

    #[test]
    fn an_outage_stops_the_clock_a_grace_after_the_last_proof() {
        let t0 = Instant::now();
        let mut clock = AgentClock::default();
        clock.caught_up(t0);
        let seen = clock.at(t0);
        // Nine seconds without proof: the clock stood still after the grace.
        assert_eq!(clock.at(t0 + 9 * S) - seen, GRACE);
        clock.caught_up(t0 + 9 * S);
        assert_eq!(clock.at(t0 + 9 * S) - seen, GRACE);
        // And runs again from the proof on, while proof keeps coming.
        assert_eq!(clock.unproven_for(t0 + 10 * S), Some(S));
        clock.caught_up(t0 + 10 * S);
        clock.caught_up(t0 + 11 * S);
        assert_eq!(clock.at(t0 + 11 * S) - seen, GRACE + 2 * S);
    }

    #[test]
    fn what_arrives_during_an_outage_ages_from_the_next_proof() {
        let t0 = Instant::now();
        let mut clock = AgentClock::default();
        clock.caught_up(t0);
        let during = clock.at(t0 + 5 * S);
        clock.caught_up(t0 + 8 * S);
        assert_eq!(clock.at(t0 + 8 * S), during);
        assert_eq!(clock.at(t0 + 9 * S) - during, S);
    }

    #[test]
    fn an_agent_live_when_the_clock_stopped_is_heard_anew_where_it_resumed() {
        let t0 = Instant::now();
        let ttl = 3 * S;
        let mut clock = AgentClock::default();
        clock.caught_up(t0);
        let late = clock.at(t0); // heard just before the outage
        let early = t0.checked_sub(5 * S).unwrap_or(t0); // silent for five seconds by then
        assert_eq!(clock.heard(late, ttl), late, "no outage yet");
        clock.caught_up(t0 + 9 * S);
        let resumed = clock.at(t0 + 9 * S);
        assert_eq!(resumed, late + GRACE);
        assert_eq!(clock.heard(late, ttl), resumed);
        assert_eq!(clock.heard(early, ttl), early, "gone before it began");
        let after = clock.at(t0 + 10 * S);
        assert_eq!(clock.heard(after, ttl), after, "heard since");
    }

    #[test]
    fn old_proof_changes_nothing() {
        let t0 = Instant::now();
        let mut clock = AgentClock::default();
        clock.caught_up(t0 + 5 * S);
        let before = clock.at(t0 + 6 * S);
        clock.caught_up(t0 + 2 * S);
        assert_eq!(clock.at(t0 + 6 * S), before);
    }

    fn found(led: bool, messages: u64, last_sequence: u64) -> Look {
        Look::Found {
            created: time::OffsetDateTime::UNIX_EPOCH,
            led,
            messages,
            last_sequence,
        }
    }

    #[test]
    fn only_a_led_bucket_with_nothing_undelivered_proves_the_watch_caught_up() {
        assert!(found(true, 3, 10).proves_caught_up(10));
        assert!(!found(true, 3, 10).proves_caught_up(9), "one not delivered");
        assert!(
            !found(false, 3, 10).proves_caught_up(10),
            "no leader: no writes"
        );
        assert!(found(true, 0, 10).proves_caught_up(0), "all expired");
        assert!(!Look::Unanswered.proves_caught_up(10));
        assert!(!Look::Missing.proves_caught_up(10));
    }

    #[test]
    fn a_watch_behind_is_stuck_only_when_it_stops_moving() {
        let mut p = Progress {
            delivered: 5,
            ..Progress::default()
        };
        assert!(!p.stuck());
        p.delivered = 6; // it moved
        assert!(!p.stuck());
        assert!(!p.stuck());
        assert!(p.stuck(), "three looks without moving");
    }

    #[test]
    fn a_look_is_due_without_recent_proof_or_when_the_check_is() {
        let t0 = Instant::now();
        let mut p = Progress::default();
        assert!(p.look_due(t0, t0, S), "never proven");
        p.proved = Some(t0);
        assert!(!p.look_due(t0 + Duration::from_millis(100), t0, S));
        assert!(p.look_due(t0 + PROBE_EVERY, t0, S));
        assert!(p.look_due(t0 + Duration::from_millis(100), t0 - S, S));
    }
}
