//! An asynchronous job's way out: its final record in the results bucket, written before
//! its input is acked (`X-Result-Key`, see [`natserve_protocol::results`]); and the same
//! record of a synchronous reply that must outlive the broker (`X-Reply-Key`), written
//! after the reply is published and before its input is acked.
//!
//! A record that does not land (its bucket has no leader while a JetStream cluster elects
//! one, the connection is down) is tried again every [`WRITE_RETRY`] until the request's
//! deadline, each try bounded by [`WRITE_WITHIN`], its message kept alive meanwhile with
//! `Progress` acks, so the wait costs no delivery. And a message delivered again whose
//! request already has its record (its ack was lost, or its agent died after writing it)
//! is answered from the record, not run again.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use natserve_protocol::buckets::DEFAULT_RESULT_TTL;
use natserve_protocol::records::is_result_id;
use natserve_protocol::results::{is_reply_key, Finished, ResultsError};
use natserve_protocol::{headers, unix_ms, JobState, Outcome, ResultRecord};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{header, Outbox};

/// How long one write or read of a record may take before it counts as failed.
pub const WRITE_WITHIN: Duration = Duration::from_secs(2);
/// Pause between tries of a record that did not land.
pub const WRITE_RETRY: Duration = Duration::from_millis(250);
/// How long a record is tried at most, whatever its request's deadline.
pub const WRITE_FOR_AT_MOST: Duration = Duration::from_secs(30);

/// Until when a record of `msg` is worth trying: the ingress reads it until the
/// request's deadline; at most [`WRITE_FOR_AT_MOST`], and that long without a deadline.
fn worth_trying_until(msg: &jetstream::Message) -> Instant {
    let now = Instant::now();
    let cap = now + WRITE_FOR_AT_MOST;
    match headers::deadline_ms(msg.headers.as_ref()) {
        Some(deadline) => cap.min(now + Duration::from_millis(deadline.saturating_sub(unix_ms()))),
        None => cap,
    }
}

impl Outbox {
    /// Writes a synchronous reply's record under its `X-Reply-Key`. Best effort: the core
    /// NATS reply follows whatever happens here, and a reply too large for one message
    /// (it goes as a claim check) is not recorded.
    pub(super) async fn record_reply(
        &self,
        msg: &jetstream::Message,
        key: &str,
        outcome: Outcome,
        body: &[u8],
        batch_sizes: Option<&str>,
    ) {
        if !is_reply_key(key) {
            warn!(
                key,
                "not writing a reply under a key that is not a reply key"
            );
            self.metrics.count_result("refused");
            return;
        }
        let record = self.done_record(msg, outcome, batch_sizes);
        let ttl = ttl(msg);
        match self
            .write_until_landed(msg, || self.results.record_reply(key, &record, body, ttl))
            .await
        {
            Ok(Finished::Written) => self.metrics.count_result("reply_written"),
            Ok(Finished::AlreadyDone) => self.metrics.count_result("duplicate"),
            Err(e @ ResultsError::TooLarge { .. }) => {
                debug!(route = %self.route, key, error = %e, "reply too large to record");
                self.metrics.count_result("too_large");
            }
            Err(e) => {
                warn!(route = %self.route, key, error = %e, "could not record the reply");
                self.metrics.count_result("failed");
            }
        }
    }

    fn done_record(
        &self,
        msg: &jetstream::Message,
        outcome: Outcome,
        batch_sizes: Option<&str>,
    ) -> ResultRecord {
        ResultRecord {
            state: JobState::Done,
            route: self.places.of(&msg.subject).at.route.clone(),
            deadline_ms: headers::deadline_ms(msg.headers.as_ref()).unwrap_or(0),
            written_ms: natserve_protocol::unix_ms(),
            status: Some(outcome),
            content_type: (outcome == Outcome::Ok).then(|| self.mime.clone()),
            batch_sizes: batch_sizes.map(str::to_owned),
        }
    }

    /// Writes an asynchronous job's final record, before its input is acked. A result
    /// too large for one NATS message is recorded as a server error saying so: the job
    /// is answered at once rather than left pending (the object-store claim check that
    /// would carry it is not there yet; `ResultsError::TooLarge` is where it goes).
    pub(super) async fn store_result(
        &self,
        msg: &jetstream::Message,
        key: &str,
        outcome: Outcome,
        body: &[u8],
        batch_sizes: Option<&str>,
    ) {
        if !is_result_id(key) {
            warn!(
                key,
                "not writing a result under a key that is not a result id"
            );
            self.metrics.count_result("refused");
            return;
        }
        let ttl = ttl(msg);
        let mut record = self.done_record(msg, outcome, batch_sizes);
        let written = self
            .write_until_landed(msg, || self.results.finish(key, &record, body, ttl))
            .await;
        let written = match written {
            Err(too_large @ ResultsError::TooLarge { .. }) => {
                warn!(route = %self.route, key, error = %too_large, "result too large for the results bucket");
                self.metrics.count_result("too_large");
                record.status = Some(Outcome::ServerError);
                record.content_type = None;
                let text = format!(
                    "internal error: {too_large}; results that large are not supported yet"
                );
                self.write_until_landed(msg, || {
                    self.results.finish(key, &record, text.as_bytes(), ttl)
                })
                .await
            }
            other => other,
        };
        match written {
            Ok(Finished::Written) => self.metrics.count_result("written"),
            Ok(Finished::AlreadyDone) => self.metrics.count_result("duplicate"),
            Err(e) => {
                warn!(route = %self.route, key, error = %e, "could not write the result");
                self.metrics.count_result("failed");
            }
        }
    }
}

impl Outbox {
    /// Runs `write` until it lands, fails for good, or [`worth_trying_until`] passes,
    /// keeping `msg` alive meanwhile (see the module's documentation).
    async fn write_until_landed<T, Fut>(
        &self,
        msg: &jetstream::Message,
        mut write: impl FnMut() -> Fut,
    ) -> Result<T, ResultsError>
    where
        Fut: Future<Output = Result<T, ResultsError>>,
    {
        let until = worth_trying_until(msg);
        let started = Instant::now();
        let tries = async {
            let mut failed = 0u32;
            loop {
                let error = match tokio::time::timeout(WRITE_WITHIN, write()).await {
                    Ok(Ok(done)) => {
                        if failed > 0 {
                            info!(route = %self.route, tries = failed + 1, waited_ms = started.elapsed().as_millis() as u64, "record landed after the results bucket came back");
                        }
                        return Ok(done);
                    }
                    Ok(Err(e)) if !e.is_transient() => return Err(e),
                    Ok(Err(e)) => e,
                    Err(_) => ResultsError::Nats(format!(
                        "no answer within {} ms",
                        WRITE_WITHIN.as_millis()
                    )),
                };
                failed += 1;
                if Instant::now() + WRITE_RETRY >= until {
                    return Err(error);
                }
                debug!(route = %self.route, error = %error, tries = failed, "record not written yet; trying again");
                tokio::time::sleep(WRITE_RETRY).await;
            }
        };
        crate::run::holding(tries, || self.progress(std::slice::from_ref(msg))).await
    }

    /// Answers a message delivered again from the record an earlier run of its request
    /// left (its reply under `X-Reply-Key`, or its job's final record under
    /// `X-Result-Key`), and acks it: that run finished, only its ack was lost (a
    /// JetStream cluster electing the consumer's leader), or its agent died after writing
    /// the record. True when answered so; false when there is no finished record, or it
    /// cannot be read now: then the message runs.
    pub async fn answer_from_record(&self, msg: &jetstream::Message) -> bool {
        let key = match (
            header(msg, headers::RESULT_KEY),
            header(msg, headers::REPLY_KEY),
        ) {
            (Some(key), _) if is_result_id(key) => key,
            (None, Some(key)) if is_reply_key(key) => key,
            _ => return false,
        };
        let found = tokio::time::timeout(WRITE_WITHIN, self.results.read(key)).await;
        let (record, body) = match found {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => return false,
            Ok(Err(e)) => {
                debug!(route = %self.route, key, error = %e, "cannot read the record of a redelivered request; running it");
                return false;
            }
            Err(_) => return false,
        };
        let (JobState::Done, Some(outcome)) = (record.state, record.status) else {
            return false; // a job still pending: it never finished
        };
        debug!(route = %self.route, stage = self.stage, key, "redelivered request already answered; answering it from its record");
        let mime = record.content_type.as_deref().unwrap_or(&self.mime);
        self.publish_reply(msg, outcome, body, record.batch_sizes.as_deref(), 0, mime)
            .await;
        self.metrics.count_result("answered_from_record");
        self.settle(msg, AckKind::Ack).await;
        true
    }
}

/// How long `msg`'s record is kept: its `X-Result-Ttl`, or the default.
fn ttl(msg: &jetstream::Message) -> Duration {
    header(msg, headers::RESULT_TTL)
        .and_then(|t| t.trim().parse().ok())
        .map_or(DEFAULT_RESULT_TTL, Duration::from_secs)
}
