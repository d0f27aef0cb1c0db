//! Registration records agents write to KV and the ingress watches.
//!
//! `<ns>_routes` holds one [`RouteRecord`] per route slug; `<ns>_agents` holds one
//! [`AgentRecord`] per live agent, refreshed every heartbeat and deleted on a clean stop.

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;

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
