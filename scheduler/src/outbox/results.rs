//! An asynchronous job's way out: its final record in the results bucket, written before
//! its input is acked (`X-Result-Key`, see [`natserve_protocol::results`]); and the same
//! record of a synchronous reply that must outlive the broker (`X-Reply-Key`), written
//! before the reply is published.

use std::time::Duration;

use async_nats::jetstream;
use natserve_protocol::buckets::DEFAULT_RESULT_TTL;
use natserve_protocol::records::is_result_id;
use natserve_protocol::results::{is_reply_key, Finished, ResultsError};
use natserve_protocol::{headers, JobState, Outcome, ResultRecord};
use tracing::{debug, warn};

use super::{header, Outbox};

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
        match self
            .results
            .record_reply(key, &record, body, ttl(msg))
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
        let written = match self.results.finish(key, &record, body, ttl).await {
            Err(too_large @ ResultsError::TooLarge { .. }) => {
                warn!(route = %self.route, key, error = %too_large, "result too large for the results bucket");
                self.metrics.count_result("too_large");
                record.status = Some(Outcome::ServerError);
                record.content_type = None;
                let text = format!(
                    "internal error: {too_large}; results that large are not supported yet"
                );
                self.results
                    .finish(key, &record, text.as_bytes(), ttl)
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

/// How long `msg`'s record is kept: its `X-Result-Ttl`, or the default.
fn ttl(msg: &jetstream::Message) -> Duration {
    header(msg, headers::RESULT_TTL)
        .and_then(|t| t.trim().parse().ok())
        .map_or(DEFAULT_RESULT_TTL, Duration::from_secs)
}
