//! The NATS side of one request: publish it to its route's first stage through JetStream,
//! then wait for the one reply the pipeline sends back.
//!
//! Both waits end by the request's deadline, so no request hangs: a publish ack that does
//! not come in time means NATS is unavailable, a reply that does not come means timeout.
//!
//! An asynchronous job ([`Submitter::submit_async`]) waits for nothing but the publish
//! ack: its pending record goes into the results bucket first, and the agent that finishes
//! it writes the outcome there, so no ingress needs to be alive for it.
//!
//! A body or a reply larger than one NATS message goes through the payloads object store
//! (a claim check, [`natserve_protocol::payloads`]); one that fits pays nothing for it.
//!
//! A route whose queues outlive the broker (`RouteRecord::durable_replies`) gets durable
//! replies: the agent records each reply in the results bucket as well as publishing it
//! (`X-Reply-Key`), and a request whose core-NATS reply was lost — this ingress
//! reconnected meanwhile, or the deadline came — reads it there instead of answering 504.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use async_nats::{jetstream, Client, HeaderMap, Message};
use bytes::Bytes;
use natserve_protocol::payloads::{self, Hop, Payloads};
use natserve_protocol::results::{clamp_ttl, reply_key, Created};
use natserve_protocol::{headers, JobState, Names, Outcome, Rejection, ResultRecord, Results};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info};

use crate::error::RequestError;
use crate::postbox::{Postbox, Refusal};
use crate::replies::{PendingReply, PendingStream, Replies};
use crate::stream::ReplyStream;

/// How long fetching a reply that came as a claim check may take, whatever the deadline:
/// the pipeline answered in time, and its answer is better than our own 504.
pub const REPLY_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the deadline a reply is still awaited: the agent answers work that
/// expired in its queue with `timeout`, and that answer is better than our own 504.
pub const REPLY_GRACE: Duration = Duration::from_millis(250);
/// How often a request with a durable reply looks whether this ingress reconnected to
/// NATS since it was published: a reconnect may have lost its core-NATS reply.
pub const RECONNECT_CHECK: Duration = Duration::from_millis(100);
/// Pause between tries of a work publish JetStream refused for now ([`is_transient`]).
pub const PUBLISH_RETRY: Duration = Duration::from_millis(100);
/// Once a request with a durable reply saw this ingress reconnect, how often it looks
/// for its reply in the results bucket until it comes.
pub const REREAD_AFTER_RECONNECT: Duration = Duration::from_millis(500);
/// How much longer than its request's remaining deadline a durable reply is kept.
pub const REPLY_RECORD_MARGIN: Duration = Duration::from_secs(3);

/// A reply as it came from the pipeline (its body fetched, if it came as a claim check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub outcome: Outcome,
    /// The media type of an `ok` body, as the last stage declared it.
    pub content_type: Option<String>,
    pub body: Bytes,
    /// The raw `X-Batch-Sizes` header: one batch size per stage.
    pub batch_sizes: Option<String>,
}

impl Reply {
    pub fn from_message(message: Message) -> Result<Self, RequestError> {
        let headers = message.headers.unwrap_or_default();
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        let status = get(headers::STATUS)
            .ok_or_else(|| RequestError::BadReply("reply has no X-Status header".into()))?;
        let outcome = status
            .parse::<Outcome>()
            .map_err(|e| RequestError::BadReply(e.to_string()))?;
        Ok(Self {
            outcome,
            content_type: get(headers::CONTENT_TYPE),
            body: message.payload,
            batch_sizes: get(headers::BATCH_SIZES),
        })
    }

    /// The reply a results-bucket record holds; `None` while it is not done.
    pub fn from_record(record: ResultRecord, body: Bytes) -> Option<Self> {
        match (record.state, record.status) {
            (JobState::Done, Some(outcome)) => Some(Self {
                outcome,
                content_type: record.content_type,
                body,
                batch_sizes: record.batch_sizes,
            }),
            _ => None,
        }
    }
}

/// How a request's reply came.
enum Got {
    Message(Message),
    /// Read from the results bucket: its core-NATS message was lost.
    Recorded(Reply),
}

/// One request ready to go out.
#[derive(Debug)]
pub struct Submission<'a> {
    pub route: &'a str,
    pub slug: &'a str,
    pub request_id: &'a str,
    pub body: Bytes,
    pub traceparent: Option<&'a str>,
    /// Local deadline, for our own waits.
    pub deadline: Instant,
    /// The same deadline in unix milliseconds, for the agents.
    pub deadline_ms: u64,
    /// Where the reply is recorded as well, for a route with durable replies (plain
    /// requests only: not streamed, not asynchronous).
    pub durable: Option<&'a Results>,
}

/// What makes a submission an asynchronous job.
#[derive(Debug)]
pub struct AsyncJob<'a> {
    pub results: &'a Results,
    /// Its result id, also its request id on the wire.
    pub id: &'a str,
    /// Derived from an `Idempotency-Key`: an existing record is this job's earlier submit.
    pub idempotent: bool,
    pub ttl: Duration,
}

/// An accepted asynchronous job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    /// Submitted before with the same `Idempotency-Key`: not queued again.
    pub repeated: bool,
}

/// Publishes requests and collects their replies; shared by all handlers.
#[derive(Debug, Clone)]
pub struct Submitter {
    client: Client,
    jetstream: jetstream::Context,
    names: Names,
    replies: Arc<Replies>,
    payloads: Payloads,
    /// Work to the first stages, by group commit.
    postbox: Arc<Postbox>,
}

impl Submitter {
    pub fn new(client: Client, names: Names, replies: Arc<Replies>, payloads: Payloads) -> Self {
        let jetstream = jetstream::new(client.clone());
        Self {
            postbox: Arc::new(Postbox::new(client.clone(), jetstream.clone())),
            client,
            jetstream,
            names,
            replies,
            payloads,
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Whether the NATS connection is up right now (it reconnects by itself).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub async fn submit(&self, s: Submission<'_>) -> Result<Reply, RequestError> {
        // Register first: the reply may arrive before the publish ack does.
        let mut pending = self.replies.register(s.request_id);
        let end = s.deadline + REPLY_GRACE;
        // A durable reply needs to know whether this ingress reconnects after the publish.
        let durable = s
            .durable
            .map(|results| (results, reply_key(s.request_id), self.connects()));
        let mut cancel = self.publish(s).await?;
        let got = match &durable {
            None => tokio::time::timeout_at(end, pending.recv())
                .await
                .map(|message| message.map(Got::Message))
                .map_err(|_| RequestError::DeadlinePassed),
            Some((results, key, connects)) => {
                self.await_durable(&mut pending, results, key, *connects, end)
                    .await
            }
        };
        cancel.armed = false;
        let message = match got? {
            None => return Err(RequestError::Nats("reply subscription closed".into())),
            Some(Got::Recorded(reply)) => return Ok(reply),
            Some(Got::Message(message)) => message,
        };
        let claim = payloads::claim(message.headers.as_ref()).map(str::to_owned);
        let mut reply = Reply::from_message(message)?;
        if let Some(name) = claim {
            reply.body = self.fetch_reply(&name).await?;
        }
        Ok(reply)
    }

    /// How many times this ingress has connected to NATS so far.
    fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    /// Waits for a durable reply: its core-NATS message, or its record in the results
    /// bucket once this ingress has reconnected since `connects` (the message may have
    /// been lost with the connection) or the deadline came.
    async fn await_durable(
        &self,
        pending: &mut PendingReply,
        results: &Results,
        key: &str,
        mut connects: u64,
        end: Instant,
    ) -> Result<Option<Got>, RequestError> {
        let recorded = || async {
            match results.read(key).await {
                Ok(Some((record, body))) => Reply::from_record(record, body),
                Ok(None) => None,
                Err(e) => {
                    debug!(key, error = %e, "cannot read a recorded reply");
                    None
                }
            }
        };
        let mut reread_at: Option<Instant> = None;
        let mut check = tokio::time::interval_at(Instant::now() + RECONNECT_CHECK, RECONNECT_CHECK);
        check.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                message = pending.recv() => return Ok(message.map(Got::Message)),
                _ = tokio::time::sleep_until(end) => {
                    return match recorded().await {
                        Some(reply) => {
                            info!(key, "reply lost on the way; answered from the results bucket");
                            Ok(Some(Got::Recorded(reply)))
                        }
                        None => Err(RequestError::DeadlinePassed),
                    };
                }
                _ = check.tick() => {
                    let now = self.connects();
                    let reconnected = now != connects && self.is_connected();
                    let due = reread_at.is_some_and(|at| Instant::now() >= at);
                    if !reconnected && !due {
                        continue;
                    }
                    connects = now;
                    if let Some(reply) = recorded().await {
                        info!(key, "reconnected to nats; reply answered from the results bucket");
                        return Ok(Some(Got::Recorded(reply)));
                    }
                    // Not written yet (its agent may be waiting for the bucket, as when a
                    // cluster elects a new leader): look again, its reply may be lost too.
                    reread_at = Some(Instant::now() + REREAD_AFTER_RECONNECT);
                }
            }
        }
    }

    /// Submits a request to a streaming route: once it is queued, its events and then its
    /// reply come out of the returned stream, which cancels the request when dropped
    /// before its end (the HTTP client went away).
    pub async fn submit_stream(&self, s: Submission<'_>) -> Result<ReplyStream, RequestError> {
        let pending: PendingStream = self.replies.register_stream(s.request_id);
        let deadline = s.deadline;
        let cancel = self.publish(s).await?;
        Ok(ReplyStream::new(pending, deadline + REPLY_GRACE, cancel))
    }

    /// Publishes the request to its route's first stage and waits for JetStream's ack.
    /// From the ack on, the returned guard cancels the queued request when dropped armed.
    async fn publish(&self, s: Submission<'_>) -> Result<CancelOnDrop, RequestError> {
        if !self.is_connected() {
            return Err(RequestError::Nats("not connected".into()));
        }
        let mut h = HeaderMap::new();
        h.insert(headers::REQUEST_ID, s.request_id);
        h.insert(headers::REPLY_TO, self.replies.subject(s.request_id));
        // This ingress reads a batch's replies as one envelope (`crate::replies`).
        h.insert(headers::REPLY_ENVELOPE, "1");
        h.insert(headers::DEADLINE, s.deadline_ms.to_string());
        h.insert(headers::MSG_ID, format!("{}.0", s.request_id));
        if let Some(tp) = s.traceparent {
            h.insert(headers::TRACEPARENT, tp);
        }
        if s.durable.is_some() {
            let keep = s.deadline.saturating_duration_since(Instant::now()) + REPLY_RECORD_MARGIN;
            h.insert(headers::REPLY_KEY, reply_key(s.request_id));
            h.insert(headers::RESULT_TTL, clamp_ttl(keep).as_secs().to_string());
        }
        self.publish_work(&s, h).await?;
        // From here on, a client that goes away (axum drops the request's future or its
        // response body) cancels the request; a reply or the deadline disarms that.
        Ok(CancelOnDrop {
            client: self.client.clone(),
            subject: self.names.cancel_subject(),
            request_id: s.request_id.to_owned(),
            deadline_ms: s.deadline_ms,
            armed: true,
        })
    }

    /// Queues an asynchronous job: its pending record first (atomically: an idempotent
    /// retry finds it and queues nothing), then its work, with no reply subject. A job
    /// whose work could not be queued loses its record again, so a retry can submit it.
    pub async fn submit_async(
        &self,
        s: Submission<'_>,
        job: AsyncJob<'_>,
    ) -> Result<Accepted, RequestError> {
        if !self.is_connected() {
            return Err(RequestError::Nats("not connected".into()));
        }
        let record = ResultRecord::pending(s.route, s.deadline_ms);
        let created = job
            .results
            .create_pending(job.id, &record, job.ttl)
            .await
            .map_err(|e| RequestError::Results(e.to_string()))?;
        match (created, job.idempotent) {
            (Created::New, _) => {}
            (Created::Exists, true) => {
                return Ok(Accepted {
                    id: job.id.to_owned(),
                    repeated: true,
                })
            }
            (Created::Exists, false) => {
                return Err(RequestError::Results(format!(
                    "result id {} is taken; submit again",
                    job.id
                )))
            }
        }
        let mut h = HeaderMap::new();
        h.insert(headers::REQUEST_ID, job.id);
        h.insert(headers::RESULT_KEY, job.id);
        h.insert(
            headers::RESULT_TTL,
            clamp_ttl(job.ttl).as_secs().to_string(),
        );
        h.insert(headers::DEADLINE, s.deadline_ms.to_string());
        h.insert(headers::MSG_ID, format!("{}.0", job.id));
        if let Some(tp) = s.traceparent {
            h.insert(headers::TRACEPARENT, tp);
        }
        if let Err(e) = self.publish_work(&s, h).await {
            job.results.forget(job.id).await;
            return Err(e);
        }
        Ok(Accepted {
            id: job.id.to_owned(),
            repeated: false,
        })
    }

    /// Publishes a request's work to its route's first stage and waits for JetStream's
    /// ack, by the submission's deadline. A body over one NATS message goes into the
    /// payloads store first, and the work carries its claim check.
    async fn publish_work(&self, s: &Submission<'_>, mut h: HeaderMap) -> Result<(), RequestError> {
        let mut body = s.body.clone();
        let mut claim = None;
        if !payloads::fits_inline(&self.client, body.len()) {
            let name = payloads::object_name(s.request_id, Hop::Stage(0));
            let put = self.payloads.put(&name, &body);
            match tokio::time::timeout_at(s.deadline, put).await {
                Err(_) => return Err(RequestError::PayloadStore("store timed out".into())),
                Ok(Err(e)) => return Err(RequestError::PayloadStore(e.to_string())),
                Ok(Ok(())) => {}
            }
            h.insert(headers::PAYLOAD_OBJECT, name.as_str());
            body = Bytes::new();
            claim = Some(name);
        }
        let subject = self.names.work_subject(s.slug, 0);
        // A stream without a leader for a moment (a JetStream cluster electing one after a
        // node died, a queue an agent is recreating) refuses or times out: try again, with
        // the same `Nats-Msg-Id` (JetStream drops a copy of one that did land), until the
        // deadline, so such seconds cost the request latency instead of a 503.
        let mut refused = None;
        let published = loop {
            let attempt = self.postbox.publish(&subject, h.clone(), body.clone());
            match tokio::time::timeout_at(s.deadline, attempt).await {
                Ok(Err(e))
                    if is_transient(e.rejection)
                        && self.is_connected()
                        && Instant::now() + PUBLISH_RETRY < s.deadline =>
                {
                    debug!(error = %e.text, "work publish refused for now; retrying");
                    refused = Some(e);
                    tokio::time::sleep(PUBLISH_RETRY).await;
                }
                // The deadline came while JetStream still refused: that is the answer.
                Err(elapsed) => break refused.map_or(Err(elapsed), |e| Ok(Err(e))),
                done => break done,
            }
        };
        if !matches!(published, Ok(Ok(_))) {
            // Nobody will consume the object: remove it now rather than at its max age.
            if let Some(name) = &claim {
                self.payloads.delete(name).await;
            }
        }
        match published {
            Err(_) => Err(RequestError::Nats(
                "no publish ack before the deadline".into(),
            )),
            Ok(Err(e)) => Err(classify_refusal(&e, s.route)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// The body of a reply that came as a claim check; the object is deleted once read.
    async fn fetch_reply(&self, name: &str) -> Result<Bytes, RequestError> {
        let fetched = tokio::time::timeout(REPLY_FETCH_TIMEOUT, self.payloads.fetch(name)).await;
        self.payloads.delete(name).await;
        match fetched {
            Err(_) => Err(RequestError::ReplyPayload(format!(
                "fetching reply object {name} took over {} s",
                REPLY_FETCH_TIMEOUT.as_secs()
            ))),
            Ok(Err(e)) => Err(RequestError::ReplyPayload(e.to_string())),
            Ok(Ok(body)) => Ok(body),
        }
    }
}

/// Whether a refused work publish may succeed if tried again shortly: no stream answered
/// (it has no leader yet, or is being made again) or no ack came. A full queue, a body too
/// large, or anything else the server said is an answer, not a moment.
fn is_transient(rejection: Rejection) -> bool {
    matches!(rejection, Rejection::NoStream | Rejection::Unreachable)
}

/// Names a request on the cancel subject when its HTTP client went away before the reply
/// came, so agents drop it unrun, or tell its worker if it is running.
#[derive(Debug)]
pub struct CancelOnDrop {
    client: Client,
    subject: String,
    request_id: String,
    deadline_ms: u64,
    /// Cleared once the request has its answer.
    pub armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed || natserve_protocol::unix_ms() >= self.deadline_ms {
            return; // answered, or expired: agents skip expired work by themselves
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let subject = std::mem::take(&mut self.subject);
        let mut h = HeaderMap::new();
        h.insert(headers::DEADLINE, self.deadline_ms.to_string());
        let id = bytes::Bytes::from(std::mem::take(&mut self.request_id));
        runtime.spawn(async move {
            if let Err(e) = client.publish_with_headers(subject, h, id).await {
                tracing::debug!(error = %e, "cancel publish failed");
            }
        });
    }
}

/// Turns a failed JetStream publish into the request's error. A body too large for one
/// message went to the payloads store before the publish, so `TooLarge` means only that
/// the server lowered its `max_payload` meanwhile: NATS cannot take the request now.
pub fn classify_publish_error(error: &PublishError, route: &str) -> RequestError {
    classify_refusal(&Refusal::of(error), route)
}

/// The answer to a request whose work JetStream refused for good.
pub fn classify_refusal(refusal: &Refusal, route: &str) -> RequestError {
    match refusal.rejection {
        Rejection::NoStream => RequestError::NotServed {
            route: route.to_owned(),
        },
        Rejection::QueueFull => RequestError::QueueFull {
            route: route.to_owned(),
        },
        Rejection::TooLarge | Rejection::Unreachable | Rejection::Other => {
            RequestError::Nats(refusal.text.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::PublishErrorKind;

    fn message(headers: &[(&str, &str)], body: &'static str) -> Message {
        let mut h = HeaderMap::new();
        for &(k, v) in headers {
            h.insert(k, v);
        }
        Message {
            subject: "ns.reply.i.r".into(),
            reply: None,
            payload: Bytes::from_static(body.as_bytes()),
            headers: Some(h),
            status: None,
            description: None,
            length: body.len(),
        }
    }

    #[test]
    fn reads_a_reply() {
        let m = message(
            &[
                ("X-Status", "ok"),
                ("Content-Type", "text/csv"),
                ("X-Batch-Sizes", "4,1"),
            ],
            "a,b",
        );
        let r = Reply::from_message(m).unwrap();
        assert_eq!(r.outcome, Outcome::Ok);
        assert_eq!(r.content_type.as_deref(), Some("text/csv"));
        assert_eq!(r.batch_sizes.as_deref(), Some("4,1"));
        assert_eq!(r.body, "a,b");
    }

    #[test]
    fn a_reply_without_a_known_status_is_bad() {
        let m = message(&[], "x");
        assert!(matches!(
            Reply::from_message(m),
            Err(RequestError::BadReply(_))
        ));
        let m = message(&[("X-Status", "teapot")], "x");
        assert!(matches!(
            Reply::from_message(m),
            Err(RequestError::BadReply(_))
        ));
    }

    #[test]
    fn classifies_publish_errors() {
        let route = "/r";
        let e = PublishError::new(PublishErrorKind::StreamNotFound);
        assert!(matches!(
            classify_publish_error(&e, route),
            RequestError::NotServed { .. }
        ));
        let e = PublishError::new(PublishErrorKind::TimedOut);
        assert!(matches!(
            classify_publish_error(&e, route),
            RequestError::Nats(_)
        ));
        let e = PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert!(matches!(
            classify_publish_error(&e, route),
            RequestError::Nats(_)
        ));
        let full: jetstream::Error = serde_json::from_str(
            r#"{"code": 503, "err_code": 10077, "description": "maximum messages exceeded"}"#,
        )
        .unwrap();
        let e = PublishError::with_source(PublishErrorKind::Other, full);
        assert!(matches!(
            classify_publish_error(&e, route),
            RequestError::QueueFull { .. }
        ));
        let other: jetstream::Error =
            serde_json::from_str(r#"{"code": 500, "err_code": 10001, "description": "x"}"#)
                .unwrap();
        let e = PublishError::with_source(PublishErrorKind::Other, other);
        assert!(matches!(
            classify_publish_error(&e, route),
            RequestError::Nats(_)
        ));
    }
}
