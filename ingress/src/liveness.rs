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
//! between, less the grace, is not counted: a live agent then has what was left of its
//! three heartbeats to be heard again, and a dead one is found gone that much later.

use std::time::{Duration, Instant};

/// How long agents' time runs on past the last proof. Proof comes at least every
/// [`crate::watch::PROBE_EVERY`] while the bucket is healthy, so a gap longer than this
/// is an outage (or a watch that fell behind); an outage costs an agent at most this
/// much of its three heartbeats, plus the beat it was between.
pub const GRACE: Duration = Duration::from_secs(1);

/// Counted time: real time, less the outages of the agents bucket seen so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentClock {
    /// The last proof; `None` before the first, when time counts as it passes (a table
    /// nobody watches, filled by hand).
    proof: Option<Instant>,
    /// Time not counted: each gap between two proofs longer than [`GRACE`], less it.
    skipped: Duration,
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
        if let Some(proof) = self.proof {
            if at <= proof {
                return;
            }
            self.skipped += at.saturating_duration_since(proof + GRACE);
        }
        self.proof = Some(at);
    }

    /// How long real time has run without proof, as of `now`; `None` before the first.
    pub fn unproven_for(&self, now: Instant) -> Option<Duration> {
        self.proof.map(|p| now.saturating_duration_since(p))
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
    fn old_proof_changes_nothing() {
        let t0 = Instant::now();
        let mut clock = AgentClock::default();
        clock.caught_up(t0 + 5 * S);
        let before = clock.at(t0 + 6 * S);
        clock.caught_up(t0 + 2 * S);
        assert_eq!(clock.at(t0 + 6 * S), before);
    }
}
