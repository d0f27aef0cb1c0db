//! Whether a stage's pull loops fetch a worker's next batch while it runs the current one
//! (prefetch), decided where it pays: from the stage's own measured pull round trip and
//! batch service time.
//!
//! Prefetch hides one pull round trip per batch, which is worth a lot when batches are
//! short next to it (an echo stage, a 1 ms model) and nearly nothing when they are long
//! (a 20 ms batch next to a 0.3 ms round trip gains 1.5 %). What it costs is the batch
//! held ahead: up to one batch per worker that a faster agent could have started, a
//! service time of delay for those requests. So `Auto` prefetches only while a batch
//! takes at most [`PAYS_WITHIN`] round trips: there the gain is ~10 % or more, and the
//! held batch's delay is a few round trips.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// `Auto` prefetches while a batch's service time is at most this many pull round trips.
pub const PAYS_WITHIN: u64 = 10;

/// The most batches per worker an agent keeps waiting ([`Lookahead::rounds_kept`]).
pub const MAX_ROUNDS_KEPT: usize = 4;

/// How a stage decides to pull ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// Pull only for an idle worker.
    Off,
    /// Always hold each worker's next batch (one per worker) while it runs.
    On,
    /// Prefetch while batches are short next to the pull round trip ([`PAYS_WITHIN`]).
    #[default]
    Auto,
}

/// A stage's measurements and its decision, shared by its pull loops and batches.
#[derive(Debug, Default)]
pub struct Lookahead {
    mode: Prefetch,
    /// Estimates in microseconds; 0 while nothing was measured.
    round_trip_us: AtomicU64,
    service_us: AtomicU64,
}

impl Lookahead {
    pub fn new(mode: Prefetch) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    pub fn mode(&self) -> Prefetch {
        self.mode
    }

    /// A pull that did not wait for work to arrive (a `no_wait` pull, or one whose work
    /// was queued already): one round trip. The estimate falls fast and rises slowly, so
    /// one slow answer (a scheduling hiccup) does not switch a slow stage to prefetch.
    pub fn observe_pull(&self, took: Duration) {
        update(&self.round_trip_us, micros(took), |old, new| {
            if new < old {
                (old + new) / 2
            } else {
                old + (new - old) / 64
            }
        });
    }

    /// How long a worker took for one batch, from sending it to its results.
    pub fn observe_batch(&self, took: Duration) {
        update(&self.service_us, micros(took), |old, new| {
            old - old / 8 + new / 8
        });
    }

    /// Whether a loop pulls its worker's next batch before the worker is free.
    pub fn ahead(&self) -> bool {
        match self.mode {
            Prefetch::Off => false,
            Prefetch::On => true,
            Prefetch::Auto => {
                let round_trip = self.round_trip_us.load(Ordering::Relaxed);
                let service = self.service_us.load(Ordering::Relaxed);
                round_trip > 0 && service > 0 && service <= PAYS_WITHIN * round_trip
            }
        }
    }

    /// How many batches per worker may wait on this agent beyond what its workers run:
    /// those that start within [`PAYS_WITHIN`] round trips (the rest would wait longer
    /// here than going back to the stream and to another agent costs), at most
    /// [`MAX_ROUNDS_KEPT`]. `Off` keeps none, `On` at least one; while nothing is
    /// measured yet, one.
    pub fn rounds_kept(&self) -> usize {
        let round_trip = self.round_trip_us.load(Ordering::Relaxed);
        let service = self.service_us.load(Ordering::Relaxed);
        let measured = if round_trip == 0 || service == 0 {
            1
        } else {
            (PAYS_WITHIN * round_trip / service).min(MAX_ROUNDS_KEPT as u64) as usize
        };
        match self.mode {
            Prefetch::Off => 0,
            Prefetch::On => measured.max(1),
            Prefetch::Auto => measured,
        }
    }

    /// A batch's measured service time, where it is longer than [`PAYS_WITHIN`] pull
    /// round trips: what waits for the next batch here waits that long.
    pub fn long_batch(&self) -> Option<Duration> {
        let round_trip = self.round_trip_us.load(Ordering::Relaxed);
        let service = self.service_us.load(Ordering::Relaxed);
        (round_trip > 0 && service > PAYS_WITHIN * round_trip)
            .then(|| Duration::from_micros(service))
    }

    /// The current estimates (round trip, service time), for logs and tests.
    pub fn estimates(&self) -> (Duration, Duration) {
        let get = |a: &AtomicU64| Duration::from_micros(a.load(Ordering::Relaxed));
        (get(&self.round_trip_us), get(&self.service_us))
    }
}

/// At least 1 µs, so a measured value is never "none yet".
fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Folds `new` into `estimate` (the first sample is taken as it is). Loops race here
/// harmlessly: a lost update is one sample less.
fn update(estimate: &AtomicU64, new: u64, fold: impl Fn(u64, u64) -> u64) {
    let old = estimate.load(Ordering::Relaxed);
    let next = if old == 0 { new } else { fold(old, new).max(1) };
    estimate.store(next, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn with(round_trip: Duration, batch: Duration) -> Lookahead {
        let l = Lookahead::new(Prefetch::Auto);
        for _ in 0..50 {
            l.observe_pull(round_trip);
            l.observe_batch(batch);
        }
        l
    }

    #[test]
    fn short_batches_pull_ahead_and_long_ones_do_not() {
        // An echo stage, a 1 ms model: the round trip is a large share of a batch.
        assert!(with(MS * 3 / 10, MS / 10).ahead());
        assert!(with(MS * 3 / 10, MS).ahead());
        // A 20 ms batch next to a 0.3 ms round trip holds nothing ahead.
        assert!(!with(MS * 3 / 10, MS * 20).ahead());
    }

    #[test]
    fn a_fast_stage_keeps_what_it_starts_soon_and_a_slow_one_nothing_ahead() {
        // 1 ms batches next to a 0.3 ms round trip: three rounds start within ten.
        assert_eq!(with(MS * 3 / 10, MS).rounds_kept(), 3);
        // An echo stage: bounded all the same.
        assert_eq!(with(MS * 3 / 10, MS / 100).rounds_kept(), MAX_ROUNDS_KEPT);
        // 20 ms batches: what its workers do not start now goes back.
        assert_eq!(with(MS * 3 / 10, MS * 20).rounds_kept(), 0);
        assert_eq!(
            Lookahead::new(Prefetch::Auto).rounds_kept(),
            1,
            "unmeasured"
        );
        let (off, on) = (Lookahead::new(Prefetch::Off), Lookahead::new(Prefetch::On));
        for l in [&off, &on] {
            l.observe_pull(MS);
            l.observe_batch(MS * 100);
        }
        assert_eq!((off.rounds_kept(), on.rounds_kept()), (0, 1));
    }

    #[test]
    fn nothing_is_pulled_ahead_before_anything_was_measured() {
        let l = Lookahead::new(Prefetch::Auto);
        assert!(!l.ahead());
        l.observe_pull(MS);
        assert!(!l.ahead(), "no batch measured yet");
        l.observe_batch(MS);
        assert!(l.ahead());
    }

    #[test]
    fn off_and_on_ignore_the_measurements() {
        let off = Lookahead::new(Prefetch::Off);
        let on = Lookahead::new(Prefetch::On);
        for l in [&off, &on] {
            l.observe_pull(MS);
            l.observe_batch(MS * 100);
        }
        assert!(!off.ahead());
        assert!(on.ahead());
    }

    #[test]
    fn one_slow_pull_does_not_switch_a_slow_stage_to_prefetch() {
        let l = with(MS * 3 / 10, MS * 20);
        l.observe_pull(MS * 100);
        assert!(!l.ahead(), "{:?}", l.estimates());
        // A round trip that really grew is followed, a sample at a time.
        for _ in 0..400 {
            l.observe_pull(MS * 5);
        }
        assert!(l.ahead(), "{:?}", l.estimates());
    }
}
