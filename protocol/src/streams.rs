//! The JetStream side of a stage's queue: its work-queue stream and shared durable pull
//! consumer, configured here alone (as [`crate::buckets`] does for KV), and the one
//! reading of a publish JetStream refused, for every process that publishes work.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, consumer, stream};

use crate::{Names, CONSUMER};

/// How long a message may stay unacknowledged before JetStream redelivers it to another
/// agent. It is what an agent's death costs its in-flight requests (`kill -9`: its work
/// runs elsewhere about this long later), so it must leave most of the default 3 s
/// deadline for the rerun. An agent keeps every message it holds (batching, waiting for
/// a worker, running) alive with a `Progress` ack every [`PROGRESS_EVERY`], so a live
/// agent loses its messages only if it cannot send one 20-byte publish for three
/// quarters of a second; then the request runs twice and is answered once (the ingress
/// takes the first reply, a hand-off is de-duplicated by `Nats-Msg-Id`).
pub const ACK_WAIT: Duration = Duration::from_secs(1);
/// How often a held message gets a `Progress` ack: four chances per [`ACK_WAIT`]. A batch
/// that finishes sooner (the common case) sends none.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Deliveries JetStream makes of one message. The last is answered `server_error`
/// without being run (a message whose last delivery is lost would otherwise stay in the
/// work queue unanswered), so a request gets four runs: its first, one retry after its
/// worker died mid-batch, and two more for agents that died or stalled while holding it.
pub const MAX_DELIVER: i64 = 5;

// A held message gets several chances at a `Progress` ack before its ack wait runs out,
// and a request at least a first run, a retry alone, and the delivery that answers it.
const _: () = assert!(PROGRESS_EVERY.as_millis() * 4 <= ACK_WAIT.as_millis());
const _: () = assert!(MAX_DELIVER >= 3);
/// Unacknowledged messages the consumer lets all agents of a stage hold at once.
pub const MAX_ACK_PENDING: i64 = 20_000;
/// JetStream API error code of a publish a full stream refused (`discard: new`):
/// "maximum messages exceeded" (async-nats calls it `STREAM_STORE_FAILED`).
pub const STREAM_FULL_CODE: u64 = jetstream::ErrorCode::STREAM_STORE_FAILED.0;

/// Where a stage's queue lives, how large it may grow, and on how many servers of a
/// JetStream cluster it is kept ([`crate::replicas`]).
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max_messages: i64,
    pub storage: stream::StorageType,
    pub replicas: usize,
}

/// The work-queue stream of stage `stage` of the route `slug`. A full queue refuses new
/// messages, so a publisher learns it at once ([`Rejection::QueueFull`]). Its consumer
/// names no replicas of its own, so it has as many as the stream.
pub fn work_stream_config(
    names: &Names,
    slug: &str,
    stage: u32,
    queue: &QueueConfig,
) -> stream::Config {
    stream::Config {
        name: names.stream(slug, stage),
        subjects: vec![names.work_subject(slug, stage)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: queue.storage,
        max_messages: queue.max_messages,
        discard: stream::DiscardPolicy::New,
        num_replicas: queue.replicas,
        ..Default::default()
    }
}

/// The durable pull consumer every agent of a stage shares. Acks are explicit: each
/// message is acked only once its result is safe. Created or updated (never only
/// fetched), so a consumer made by an older agent with other limits takes these.
pub fn work_consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_deliver: MAX_DELIVER,
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// Why a JetStream publish of work was refused, whoever published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The stage's stream is at its limit (`discard: new`).
    QueueFull,
    /// No stream listens on the subject: the stage is not served.
    NoStream,
    /// The message exceeds the server's `max_payload`.
    TooLarge,
    /// The server did not answer (timeout, connection lost).
    Unreachable,
    /// Anything else the server or client reported.
    Other,
}

impl Rejection {
    /// Reads the client's error kind, and for a refusal from the server its JetStream
    /// API error code: never the error's text.
    pub fn from_publish_error(error: &PublishError) -> Self {
        match error.kind() {
            PublishErrorKind::StreamNotFound => Rejection::NoStream,
            PublishErrorKind::MaxPayloadExceeded => Rejection::TooLarge,
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => Rejection::Unreachable,
            _ => match api_error_code(error) {
                Some(STREAM_FULL_CODE) => Rejection::QueueFull,
                _ => Rejection::Other,
            },
        }
    }
}

/// The JetStream API error code of a publish the server answered with an error.
fn api_error_code(error: &PublishError) -> Option<u64> {
    std::error::Error::source(error)?
        .downcast_ref::<jetstream::Error>()
        .map(|e| e.error_code().0)
}

/// Whether asking for a stream failed because it does not exist (as after a restart of a
/// nats-server that kept its store in memory), rather than because NATS did not answer.
pub fn is_missing(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(api)
            if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(json: &str) -> PublishError {
        let source: jetstream::Error = serde_json::from_str(json).unwrap();
        PublishError::with_source(PublishErrorKind::Other, source)
    }

    #[test]
    fn reads_rejections_by_kind_and_code() {
        let of = |kind| Rejection::from_publish_error(&PublishError::new(kind));
        assert_eq!(of(PublishErrorKind::StreamNotFound), Rejection::NoStream);
        assert_eq!(
            of(PublishErrorKind::MaxPayloadExceeded),
            Rejection::TooLarge
        );
        assert_eq!(of(PublishErrorKind::TimedOut), Rejection::Unreachable);
        assert_eq!(of(PublishErrorKind::BrokenPipe), Rejection::Unreachable);
        assert_eq!(of(PublishErrorKind::MaxAckPending), Rejection::Other);
        assert_eq!(of(PublishErrorKind::Other), Rejection::Other);
        let full = api_error(r#"{"code": 503, "err_code": 10077, "description": "x"}"#);
        assert_eq!(Rejection::from_publish_error(&full), Rejection::QueueFull);
        let other = api_error(
            r#"{"code": 503, "err_code": 10001, "description": "maximum messages exceeded"}"#,
        );
        assert_eq!(
            Rejection::from_publish_error(&other),
            Rejection::Other,
            "the text is never read"
        );
    }

    #[test]
    fn stream_and_consumer_follow_the_names() {
        let names = Names::new("prod").unwrap();
        let queue = QueueConfig {
            max_messages: 7,
            storage: stream::StorageType::File,
            replicas: 3,
        };
        let s = work_stream_config(&names, "v1_embed", 1, &queue);
        assert_eq!(s.name, "prod_work_v1_embed_1");
        assert_eq!(s.subjects, vec!["prod.work.v1_embed.1".to_owned()]);
        assert_eq!(s.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(s.discard, stream::DiscardPolicy::New);
        assert_eq!((s.max_messages, s.storage), (7, stream::StorageType::File));
        assert_eq!(s.num_replicas, 3);
        let c = work_consumer_config();
        assert_eq!(c.durable_name.as_deref(), Some(CONSUMER));
        assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!((c.ack_wait, c.max_deliver), (ACK_WAIT, MAX_DELIVER));
        assert_eq!(c.max_ack_pending, MAX_ACK_PENDING);
        assert_eq!(c.num_replicas, 0, "the stream's");
    }
}
