//! Registration records agents write to KV and the ingress watches.
//!
//! `<ns>_routes` holds one [`RouteRecord`] per route slug; `<ns>_agents` holds one
//! [`AgentRecord`] per live agent, refreshed every heartbeat and deleted on a clean stop;
//! `<ns>_results` holds one [`ResultRecord`] per asynchronous job (its layout: one line of
//! JSON, a newline, then the body's raw bytes).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What the ingress needs to serve a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    pub route: String,
    /// Number of stages in the pipeline; requests enter at stage 0.
    pub stages: u32,
    /// Worker class name of each stage, for humans.
    #[serde(default)]
    pub names: Vec<String>,
    /// What the route takes and answers, for its OpenAPI document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<RouteTypes>,
    /// The last stage streams events before its reply: the ingress answers the route as
    /// Server-Sent Events. Absent (an older agent) means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streams: bool,
    /// The agents keep this route's queues where they outlive a broker (file storage, or
    /// replicated): so the ingress asks for its replies to be durable too
    /// ([`crate::headers::REPLY_KEY`]). Absent (an older agent, memory storage) means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub durable_replies: bool,
    /// Where each stage's queue is, when one of them is shared with other routes (see
    /// [`queue_of`]). Absent (an older agent, nothing shared) means each stage its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<StageAt>,
}

impl RouteRecord {
    /// The place whose queue serves stage `stage` of this route.
    pub fn queue(&self, stage: u32) -> StageAt {
        queue_of(&self.route, &self.queues, stage)
    }
}

/// A place in a pipeline: stage `stage` of `route`. A stage that several routes share
/// (one `Runtime` on several routes) is one queue, named after its first place, its
/// home: the stream of the home binds the work subjects of every place, so each route's
/// work lands in it and its workers batch all routes' items together.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageAt {
    pub route: String,
    pub stage: u32,
}

/// The place whose queue serves stage `stage` of `route`, given the route's `queues`
/// (one entry per stage, or none when no stage of it is shared).
pub fn queue_of(route: &str, queues: &[StageAt], stage: u32) -> StageAt {
    match queues.get(stage as usize) {
        Some(home) => home.clone(),
        None => StageAt {
            route: route.to_owned(),
            stage,
        },
    }
}

/// A route's request and response bodies as its workers declare them (the first stage's
/// input, the last stage's output): the ingress never runs Python, so the launcher
/// writes them down and the agents register them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTypes {
    pub request: BodyType,
    pub response: BodyType,
    /// JSON schemas the two refer to as `#/components/schemas/<name>`.
    #[serde(default)]
    pub components: serde_json::Map<String, serde_json::Value>,
}

/// One body: its media type and its JSON schema (`{}`: anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyType {
    pub mime: String,
    pub schema: serde_json::Value,
}

/// One stage as hosted by one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLoad {
    pub route: String,
    pub stage: u32,
    pub name: String,
    /// Worker processes configured.
    pub workers: u32,
    /// Workers that finished loading and warming up, alive now.
    pub ready: u32,
    /// Ready workers not running a batch right now.
    pub free: u32,
}

/// A live agent, as of its last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// How often the agent refreshes this record; readers treat it as gone after three misses.
    pub heartbeat_ms: u64,
    pub stages: Vec<StageLoad>,
}

/// Where an asynchronous job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Submitted (queued or running): written by the submitter before it publishes.
    Pending,
    /// Finished: written once, by the agent that produced the outcome.
    Done,
}

/// The JSON line of a results-bucket value; the body follows it (empty while pending).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub state: JobState,
    pub route: String,
    /// The job's deadline, unix ms: queued work past it is answered `timeout`, never run.
    pub deadline_ms: u64,
    /// When this record was written, unix ms.
    pub written_ms: u64,
    /// The outcome (`X-Status`), once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<crate::Outcome>,
    /// Media type of an `ok` body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `X-Batch-Sizes` of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_sizes: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("result record has no newline after its JSON line")]
    NoNewline,
    #[error("result record's JSON line is invalid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("result record is done but has no status")]
    NoStatus,
}

impl ResultRecord {
    pub fn pending(route: &str, deadline_ms: u64) -> Self {
        Self {
            state: JobState::Pending,
            route: route.to_owned(),
            deadline_ms,
            written_ms: crate::unix_ms(),
            status: None,
            content_type: None,
            batch_sizes: None,
        }
    }

    /// The value stored in the bucket: this record's JSON, `\n`, then `body`.
    pub fn encode(&self, body: &[u8]) -> Bytes {
        let line = serde_json::to_vec(self).expect("a result record always serializes");
        let mut value = BytesMut::with_capacity(line.len() + 1 + body.len());
        value.put_slice(&line);
        value.put_u8(b'\n');
        value.put_slice(body);
        value.freeze()
    }

    /// A stored value back into its record and body.
    pub fn decode(value: &Bytes) -> Result<(Self, Bytes), RecordError> {
        let newline = value
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(RecordError::NoNewline)?;
        let record: Self = serde_json::from_slice(&value[..newline])?;
        if record.state == JobState::Done && record.status.is_none() {
            return Err(RecordError::NoStatus);
        }
        Ok((record, value.slice(newline + 1..)))
    }
}

/// Longest `Idempotency-Key` taken.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The result id of a job submitted to `route` with an `Idempotency-Key`: the same key on
/// the same route always names the same job, so a retried submit finds the first one
/// (the pending record is created atomically) instead of running again.
pub fn idempotent_result_id(route: &str, key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(route.as_bytes())
        .chain_update(b"\n")
        .chain_update(key.as_bytes())
        .finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("idem-{hex}")
}

/// Whether `id` can be a result id (a KV key and a URL path segment): 1 to 128 letters,
/// digits, `_` and `-`.
pub fn is_result_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tests/golden/results.json`, which the Python side is tested against too.
    #[test]
    fn golden_results() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/results.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for case in golden["idempotent_ids"].as_array().unwrap() {
            let id = idempotent_result_id(
                case["route"].as_str().unwrap(),
                case["key"].as_str().unwrap(),
            );
            assert_eq!(id, case["id"].as_str().unwrap());
            assert!(is_result_id(&id));
        }
        for case in golden["records"].as_array().unwrap() {
            let value = Bytes::from(case["value"].as_str().unwrap().to_owned());
            let (record, body) = ResultRecord::decode(&value).unwrap();
            let want: ResultRecord = serde_json::from_value(case["record"].clone()).unwrap();
            assert_eq!(record, want);
            assert_eq!(body, case["body"].as_str().unwrap());
            assert_eq!(
                ResultRecord::decode(&record.encode(&body)).unwrap(),
                (want, body)
            );
        }
        for bad in golden["invalid_values"].as_array().unwrap() {
            let value = Bytes::from(bad.as_str().unwrap().to_owned());
            assert!(ResultRecord::decode(&value).is_err(), "{bad}");
        }
        for bad in golden["invalid_ids"].as_array().unwrap() {
            assert!(!is_result_id(bad.as_str().unwrap()), "{bad}");
        }
    }

    #[test]
    fn a_body_may_hold_newlines() {
        let mut record = ResultRecord::pending("/r", 5);
        record.state = JobState::Done;
        record.status = Some(crate::Outcome::Ok);
        let value = record.encode(b"a\nb\n");
        assert_eq!(
            ResultRecord::decode(&value).unwrap(),
            (record, Bytes::from_static(b"a\nb\n"))
        );
    }

    #[test]
    fn agent_record_round_trips_as_json() {
        let rec = AgentRecord {
            id: "h-1".into(),
            host: "h".into(),
            pid: 1,
            heartbeat_ms: 2000,
            stages: vec![StageLoad {
                route: "/inference".into(),
                stage: 0,
                name: "Exp".into(),
                workers: 2,
                ready: 2,
                free: 1,
            }],
        };
        let json = serde_json::to_vec(&rec).unwrap();
        assert_eq!(serde_json::from_slice::<AgentRecord>(&json).unwrap(), rec);
    }
}
