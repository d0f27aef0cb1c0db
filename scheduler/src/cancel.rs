//! Requests whose HTTP client went away while they were queued. An ingress names each on
//! `<ns>.cancel`; the agent remembers the id until the request's deadline and drops the
//! message unrun when it comes up, instead of spending a worker on an answer nobody reads.
//! A cancel that arrives after the request started changes nothing: it finishes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use natserve_protocol::{headers, unix_ms};
use tracing::debug;

/// Past this many remembered ids, expired ones are forgotten on the next insert.
const PRUNE_AT: usize = 1024;

#[derive(Debug, Default)]
pub struct Cancellations {
    ids: Mutex<HashMap<String, u64>>,
}

impl Cancellations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers `id` until `deadline_ms` (unix ms), after which it expires anyway.
    pub fn insert(&self, id: &str, deadline_ms: u64) {
        let mut ids = self.lock();
        if ids.len() >= PRUNE_AT {
            let now = unix_ms();
            ids.retain(|_, deadline| *deadline > now);
        }
        ids.insert(id.to_owned(), deadline_ms);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
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
                debug!(request = id, "request cancelled by its ingress");
                self.insert(id, deadline);
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
        for i in 0..PRUNE_AT - 1 {
            c.insert(&format!("old-{i}"), now - 1);
        }
        assert!(c.contains("live") && c.contains("old-0"));
        c.insert("new", now + 60_000);
        assert!(c.contains("live") && c.contains("new"));
        assert!(!c.contains("old-0"), "expired ids are pruned");
        assert_eq!(c.len(), 2);
    }
}
