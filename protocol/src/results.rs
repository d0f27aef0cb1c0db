//! The results bucket of asynchronous jobs, as every process uses it.
//!
//! The submitter (an ingress, or `natserve.Client`) creates a job's `pending` record
//! before it publishes the work; the agent that finishes the request writes the `done`
//! record, once: a compare-and-set on the revision it read, so a request that ran twice
//! (its first agent died after writing) keeps its first answer. Anyone reads it. Each
//! record carries its own TTL (`Nats-TTL`). A bucket lost with a NATS server that kept its
//! store in memory is made again by the next read or write that fails.
//!
//! A synchronous request's reply goes there too when its route's queues outlive the
//! broker ([`crate::headers::REPLY_KEY`]): the agent publishes it, then writes it under
//! [`reply_key`] (trying again until the request's deadline while the bucket has no
//! leader), and an ingress whose core-NATS reply was lost (it reconnected, or the
//! deadline came) reads it instead. Those keys hold a `.`, which no result id does, so
//! no `GET /results/<id>` can name one.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation};
use async_nats::jetstream::{self};
use async_nats::{header, HeaderMap};
use bytes::Bytes;
use tracing::{debug, warn};

use crate::buckets::{open_bucket, replicated_results_bucket_config, BucketError, MAX_RESULT_TTL};
use crate::records::{JobState, RecordError, ResultRecord};
use crate::Names;

/// Bytes of `max_payload` left for the headers of a KV write.
pub const RECORD_HEADER_RESERVE: usize = 1024;
/// How long making a failed bucket again may take. A bucket whose JetStream cluster is
/// electing a leader fails every write the same way a lost one does, and asking the
/// server for it then answers nothing: a short bound returns the write's error soon, for
/// its caller to try again, instead of a request timeout later.
pub const HEAL_WITHIN: Duration = Duration::from_secs(2);

/// What creating a pending record found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// A record under that id exists already (an idempotent retry).
    Exists,
}

/// What writing a final record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Written,
    /// Another run of the same job wrote its answer first; it stays.
    AlreadyDone,
}

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// The record does not fit in one NATS message. Large results are to travel through
    /// the object store (a claim check in the record); until then they are refused here.
    #[error(
        "the result is {size} bytes, more than one NATS message can carry to the results \
         bucket ({limit} bytes, the server's max_payload less headers)"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("results bucket: {0}")]
    Nats(String),
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl ResultsError {
    /// Whether the same write may succeed later: NATS did not take it now (no leader,
    /// no connection, a bucket being made again), rather than it can never fit or parse.
    pub fn is_transient(&self) -> bool {
        matches!(self, ResultsError::Nats(_))
    }
}

/// The results bucket, opened (made when missing).
#[derive(Debug, Clone)]
pub struct Results {
    js: jetstream::Context,
    store: kv::Store,
    config: kv::Config,
}

/// The results-bucket key of synchronous request `request_id`'s reply.
pub fn reply_key(request_id: &str) -> String {
    format!("reply.{request_id}")
}

/// Whether `key` is a [`reply_key`] of a request id that is a valid result id.
pub fn is_reply_key(key: &str) -> bool {
    key.strip_prefix("reply.")
        .is_some_and(crate::records::is_result_id)
}

/// A TTL the server takes: whole seconds, at least one, at most [`MAX_RESULT_TTL`].
pub fn clamp_ttl(ttl: Duration) -> Duration {
    Duration::from_secs(ttl.as_secs().clamp(1, MAX_RESULT_TTL.as_secs()))
}

impl Results {
    /// Opens the bucket on `replicas` servers (`--replicas`): made so when missing, and
    /// made so again if it is lost.
    pub async fn open(
        js: &jetstream::Context,
        names: &Names,
        replicas: usize,
    ) -> Result<Self, BucketError> {
        let config = replicated_results_bucket_config(names, replicas);
        let store = open_bucket(js, config.clone()).await?;
        Ok(Self {
            js: js.clone(),
            store,
            config,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    /// Makes the bucket again if it is gone, within [`HEAL_WITHIN`]; the store we hold
    /// names it, so it works again once the bucket exists.
    async fn heal(&self, error: &str) {
        warn!(bucket = self.bucket(), error = %error, "results bucket failed; reopening it");
        match tokio::time::timeout(HEAL_WITHIN, open_bucket(&self.js, self.config.clone())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot reopen the results bucket"),
            Err(_) => warn!(
                bucket = self.bucket(),
                "results bucket not reopened in time (no leader yet?)"
            ),
        }
    }

    fn check_size(&self, size: usize) -> Result<(), ResultsError> {
        let max = self.js.client().max_payload();
        let limit = max.saturating_sub(RECORD_HEADER_RESERVE);
        if max > 0 && size > limit {
            return Err(ResultsError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// Creates the pending record of job `id`, atomically: `Exists` if there is one.
    pub async fn create_pending(
        &self,
        id: &str,
        record: &ResultRecord,
        ttl: Duration,
    ) -> Result<Created, ResultsError> {
        self.create(id, record.encode(b""), ttl).await
    }

    /// Creates `key` holding `value`, atomically, healing a lost bucket once.
    async fn create(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<Created, ResultsError> {
        let ttl = clamp_ttl(ttl);
        let mut healed = false;
        loop {
            match self.store.create_with_ttl(key, value.clone(), ttl).await {
                Ok(_) => return Ok(Created::New),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => return Ok(Created::Exists),
                Err(e) if !healed => {
                    self.heal(&e.to_string()).await;
                    healed = true;
                }
                Err(e) => return Err(ResultsError::Nats(e.to_string())),
            }
        }
    }

    /// Job `id`'s record and body; `None` when there is none (never made, or expired).
    pub async fn read(&self, id: &str) -> Result<Option<(ResultRecord, Bytes)>, ResultsError> {
        let mut healed = false;
        loop {
            match self.store.entry(id).await {
                Ok(Some(entry)) if entry.operation == Operation::Put => {
                    return Ok(Some(ResultRecord::decode(&entry.value)?))
                }
                Ok(_) => return Ok(None),
                Err(e) if !healed => {
                    self.heal(&e.to_string()).await;
                    healed = true;
                }
                Err(e) => return Err(ResultsError::Nats(e.to_string())),
            }
        }
    }

    /// Writes job `id`'s final record, unless one is there already. A pending record that
    /// expired or was lost is written anew: the answer is worth more than its absence.
    pub async fn finish(
        &self,
        id: &str,
        record: &ResultRecord,
        body: &[u8],
        ttl: Duration,
    ) -> Result<Finished, ResultsError> {
        let value = record.encode(body);
        self.check_size(value.len())?;
        let mut healed = false;
        loop {
            let error = match self.store.entry(id).await {
                Ok(found) => {
                    let revision = match found {
                        Some(e) if e.operation == Operation::Put => {
                            let done = ResultRecord::decode(&e.value)
                                .is_ok_and(|(r, _)| r.state == JobState::Done);
                            if done {
                                return Ok(Finished::AlreadyDone);
                            }
                            e.revision
                        }
                        Some(marker) => marker.revision,
                        None => 0,
                    };
                    match self.put_expecting(id, value.clone(), revision, ttl).await {
                        Ok(()) => return Ok(Finished::Written),
                        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                            debug!(id, "another run wrote this result first");
                            return Ok(Finished::AlreadyDone);
                        }
                        Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                            let limit = self.js.client().max_payload();
                            return Err(ResultsError::TooLarge {
                                size: value.len(),
                                limit,
                            });
                        }
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            if healed {
                return Err(ResultsError::Nats(error));
            }
            self.heal(&error).await;
            healed = true;
        }
    }

    /// Writes a synchronous request's reply under `key` ([`reply_key`]), unless a run of
    /// the same request wrote one first: one create, one round trip, nothing read first.
    pub async fn record_reply(
        &self,
        key: &str,
        record: &ResultRecord,
        body: &[u8],
        ttl: Duration,
    ) -> Result<Finished, ResultsError> {
        let value = record.encode(body);
        self.check_size(value.len())?;
        Ok(match self.create(key, value, ttl).await? {
            Created::New => Finished::Written,
            Created::Exists => Finished::AlreadyDone,
        })
    }

    /// Deletes job `id`'s record (its work could not be queued), best effort.
    pub async fn forget(&self, id: &str) {
        if let Err(e) = self.store.delete(id).await {
            debug!(id, error = %e, "could not delete a result record");
        }
    }

    /// A KV put with its own TTL that succeeds only if `revision` is still the key's last
    /// (0: no message yet). async-nats 0.51 has this only for `create`.
    async fn put_expecting(
        &self,
        id: &str,
        value: Bytes,
        revision: u64,
        ttl: Duration,
    ) -> Result<(), jetstream::context::PublishError> {
        let prefix = self.store.put_prefix.as_ref().unwrap_or(&self.store.prefix);
        let mut h = HeaderMap::new();
        h.insert(
            header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string(),
        );
        h.insert(
            header::NATS_MESSAGE_TTL,
            clamp_ttl(ttl).as_secs().to_string(),
        );
        self.js
            .publish_with_headers(format!("{prefix}{id}"), h, value)
            .await?
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_whole_seconds_within_bounds() {
        assert_eq!(clamp_ttl(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            clamp_ttl(Duration::from_millis(2500)),
            Duration::from_secs(2)
        );
        assert_eq!(clamp_ttl(Duration::from_secs(u64::MAX)), MAX_RESULT_TTL);
    }

    #[test]
    fn reply_keys_are_never_result_ids() {
        let key = reply_key("caller-1a2b3c4d");
        assert_eq!(key, "reply.caller-1a2b3c4d");
        assert!(is_reply_key(&key));
        assert!(!crate::records::is_result_id(&key));
        for bad in ["reply.", "reply.a.b", "reply.a*", "result.abc", "abc"] {
            assert!(!is_reply_key(bad), "{bad}");
        }
    }
}
