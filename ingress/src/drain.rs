//! Draining: the flag that turns new work away during shutdown, and the in-flight count
//! shutdown waits on.
//!
//! An [`InflightGuard`] is held by each accepted request for as long as its HTTP future
//! lives, so a client that disconnects stops counting the moment axum drops the future.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;

/// Shared by every handler; cheap to query on each request.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    inflight: watch::Sender<usize>,
    gauge: IntGauge,
}

impl Drain {
    pub fn new(gauge: IntGauge) -> Self {
        Self {
            draining: AtomicBool::new(false),
            inflight: watch::Sender::new(0),
            gauge,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn inflight(&self) -> usize {
        *self.inflight.borrow()
    }

    /// Counts one request as in flight until the guard drops.
    pub fn enter(&self) -> InflightGuard<'_> {
        self.inflight.send_modify(|n| *n += 1);
        self.gauge.inc();
        InflightGuard { drain: self }
    }

    /// Waits until no request is in flight or `grace` passes; true when none is left.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let mut rx = self.inflight.subscribe();
        let idle = tokio::time::timeout(grace, rx.wait_for(|n| *n == 0)).await;
        idle.is_ok()
    }
}

/// Keeps one request counted as in flight; see [`Drain::enter`].
#[derive(Debug)]
pub struct InflightGuard<'a> {
    drain: &'a Drain,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.drain.inflight.send_modify(|n| *n -= 1);
        self.drain.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_last_request_or_the_grace_period() {
        let drain = std::sync::Arc::new(Drain::new(IntGauge::new("g", "g").unwrap()));
        assert!(drain.wait_idle(Duration::from_secs(1)).await);

        let guard = drain.enter();
        assert_eq!(drain.inflight(), 1);
        assert!(!drain.wait_idle(Duration::from_secs(1)).await);

        let waiter = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.wait_idle(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(guard);
        assert!(waiter.await.unwrap());
        assert_eq!(drain.inflight(), 0);
        assert_eq!(drain.gauge.get(), 0);
    }

    #[test]
    fn draining_is_sticky() {
        let drain = Drain::new(IntGauge::new("g", "g").unwrap());
        assert!(!drain.is_draining());
        drain.start_draining();
        assert!(drain.is_draining());
    }
}
