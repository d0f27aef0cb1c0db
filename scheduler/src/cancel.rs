//! Requests whose HTTP client went away. An ingress names each on `<ns>.cancel`; the agent
//! remembers the id until the request's deadline and drops the message unrun when it comes
//! up, instead of spending a worker on an answer nobody reads. A request already running
//! is told to its worker (`crate::run` watches [`Cancellations::subscribe`]), which may
//! stop early; its result, if any, is still answered.
//!
//! Anyone who can publish on the cancel subject can fill this table, so it is bounded: at
//! most [`CAPACITY`] ids of at most [`MAX_ID_LEN`] bytes, each kept no longer than
//! [`MAX_REMEMBER`] whatever deadline it claims. A cancel that does not fit is dropped: the
//! request then runs, which is what it would have done without the cancel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use natserve_protocol::{headers, unix_ms};
use tracing::debug;

/// Most ids remembered at once (a few MiB at most).
pub const CAPACITY: usize = 65_536;
/// Longest id remembered; natserve's own are 32 characters.
pub const MAX_ID_LEN: usize = 128;
/// Longest an id is remembered, whatever its deadline says.
pub const MAX_REMEMBER_MS: u64 = 10 * 60 * 1000;
/// Expired ids are swept once the table holds this many, then at twice what a sweep left,
/// so sweeping stays proportional to inserts.
const FIRST_SWEEP_AT: usize = 1024;

/// A full table is swept at most this often.
const FULL_SWEEP_EVERY_MS: u64 = 1000;

#[derive(Debug)]
struct Table {
    ids: HashMap<String, u64>,
    sweep_at: usize,
    swept_ms: u64,
}

#[derive(Debug)]
pub struct Cancellations {
    table: Mutex<Table>,
    /// Bumped on every id remembered, so running batches look at their items again.
    inserted: tokio::sync::watch::Sender<u64>,
}

impl Default for Cancellations {
    fn default() -> Self {
        Self {
            table: Mutex::new(Table {
                ids: HashMap::new(),
                sweep_at: FIRST_SWEEP_AT,
                swept_ms: 0,
            }),
            inserted: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Cancellations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers `id` until `deadline_ms` (unix ms) or [`MAX_REMEMBER_MS`] from now,
    /// whichever comes first; false when it was not remembered (too long, or table full).
    pub fn insert(&self, id: &str, deadline_ms: u64) -> bool {
        if id.len() > MAX_ID_LEN {
            return false;
        }
        let now = unix_ms();
        let until = deadline_ms.min(now + MAX_REMEMBER_MS);
        let mut table = self.lock();
        let full = table.ids.len() >= CAPACITY;
        if table.ids.len() >= table.sweep_at
            && (!full || now >= table.swept_ms + FULL_SWEEP_EVERY_MS)
        {
            table.ids.retain(|_, deadline| *deadline > now);
            table.sweep_at = (table.ids.len() * 2).clamp(FIRST_SWEEP_AT, CAPACITY);
            table.swept_ms = now;
        }
        if table.ids.len() >= CAPACITY && !table.ids.contains_key(id) {
            return false;
        }
        table.ids.insert(id.to_owned(), until);
        drop(table);
        self.inserted.send_modify(|n| *n += 1);
        true
    }

    /// Changes whenever an id is remembered: a running batch waits on it to learn that
    /// one of its requests was cancelled.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inserted.subscribe()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().ids.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.lock().ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribes to `subject` and records every cancellation until the client closes.
    pub async fn follow(
        self: Arc<Self>,
        client: &async_nats::Client,
        subject: String,
    ) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
        let mut sub = client.subscribe(subject).await?;
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(id) = std::str::from_utf8(&msg.payload) else {
                    continue;
                };
                let deadline = headers::deadline_ms(msg.headers.as_ref())
                    .unwrap_or_else(|| unix_ms() + 60_000);
                if self.insert(id, deadline) {
                    debug!(request = id, "request cancelled by its ingress");
                } else {
                    debug!("cancellation not remembered: table full or id too long");
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_ids_and_forgets_expired_ones_when_full() {
        let c = Cancellations::default();
        let now = unix_ms();
        c.insert("live", now + 60_000);
        for i in 0..FIRST_SWEEP_AT - 1 {
            c.insert(&format!("old-{i}"), now - 1);
        }
        assert!(c.contains("live") && c.contains("old-0"));
        c.insert("new", now + 60_000);
        assert!(c.contains("live") && c.contains("new"));
        assert!(!c.contains("old-0"), "expired ids are pruned");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_flood_of_far_future_cancels_stays_bounded() {
        let c = Cancellations::default();
        let far = u64::MAX / 2;
        let remembered = (0..100_000)
            .filter(|i| c.insert(&format!("{i:032x}"), far))
            .count();
        assert_eq!(remembered, CAPACITY);
        assert_eq!(c.len(), CAPACITY);
        assert!(!c.insert(&"x".repeat(MAX_ID_LEN + 1), unix_ms() + 1000));
        // No deadline keeps an id longer than MAX_REMEMBER_MS.
        let until = c.lock().ids.values().copied().max().unwrap();
        assert!(until <= unix_ms() + MAX_REMEMBER_MS, "{until}");
    }
}
