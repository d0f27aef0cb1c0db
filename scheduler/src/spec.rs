//! What one stage of a pipeline is, as the launcher describes it to an agent.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    pub route: String,
    /// 0-based index of this stage in its route's pipeline.
    pub stage: u32,
    /// Worker class name, for humans.
    pub name: String,
    /// Where a worker process finds the stage's code, opaque to the agent and handed to
    /// each worker in `NATSERVE_WORKER_SPEC`: for Python, `module:qualname`.
    pub worker: String,
    /// Worker processes this agent runs for the stage.
    pub num: u32,
    pub max_batch_size: u32,
    /// Longest wait for a batch to fill, measured from its first item.
    pub max_wait_ms: u64,
    /// Longest one batch may run before its worker is killed; 0 means only the items'
    /// own deadlines bound it.
    #[serde(default)]
    pub timeout_ms: u64,
    /// One environment dict per worker process (e.g. GPU pinning).
    #[serde(default)]
    pub env: Option<Vec<std::collections::BTreeMap<String, String>>>,
    /// Media type of the last stage's output.
    #[serde(default = "default_mime")]
    pub mime: String,
}

fn default_mime() -> String {
    "application/json".to_owned()
}

impl StageSpec {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    pub fn batch_timeout(&self) -> Option<Duration> {
        (self.timeout_ms > 0).then(|| Duration::from_millis(self.timeout_ms))
    }
}

/// Where a stage sits in its pipeline, which decides where its results go.
#[derive(Debug, Clone)]
pub struct Placement {
    pub slug: String,
    /// Number of stages in the route.
    pub stages: u32,
}
