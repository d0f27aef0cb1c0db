//! The launcher → agent contract: the JSON document (`--config`) that tells an agent which
//! routes exist, which of their stages it hosts, and how to start a worker process.
//!
//! `tests/golden/agent_config.json` is the reference document; the Python launcher's
//! tests assert the same file from the writer's side. Unknown keys are refused, so a key
//! renamed on one side fails loudly instead of falling back to a default. Counts that
//! must be at least one are `NonZeroU32`, so no reader needs a `.max(1)` guard.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::names::route_slug;
use crate::records::{queue_of, StageAt};

/// The whole document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Command that starts one worker process; the agent runs it as is.
    pub worker_cmd: Vec<String>,
    /// Every route of the program, whether or not this agent hosts a stage of it.
    pub routes: Vec<RouteSpec>,
    /// The stages this agent hosts.
    pub stages: Vec<StageSpec>,
}

/// A route and the worker names of all its stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub route: String,
    pub names: Vec<String>,
    /// Request and response types, registered for the route's OpenAPI document.
    #[serde(default)]
    pub types: Option<crate::RouteTypes>,
    /// Whether the last stage streams its answers (Mosec's `SSEWorker`): the ingress then
    /// answers the route as Server-Sent Events.
    #[serde(default)]
    pub streams: bool,
    /// Where each stage's queue is when a stage is shared with other routes: one entry
    /// per stage (its own place where not shared), or none when nothing is shared. Only
    /// a stage's home is listed in [`AgentConfig::stages`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<StageAt>,
}

impl RouteSpec {
    /// The place whose queue serves stage `stage` of this route.
    pub fn queue(&self, stage: u32) -> StageAt {
        queue_of(&self.route, &self.queues, stage)
    }
}

/// One place a hosted stage serves: its route, its index there, and how many stages the
/// route has (so whether the place is the route's first or last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub at: StageAt,
    pub stages_in_route: u32,
}

impl Place {
    pub fn is_first(&self) -> bool {
        self.at.stage == 0
    }

    pub fn is_last(&self) -> bool {
        self.at.stage + 1 == self.stages_in_route
    }
}

/// One stage as this agent hosts it. Each worker process also gets it, as JSON, in
/// `NATSERVE_WORKER_SPEC`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub route: String,
    /// 0-based index of this stage in its route's pipeline.
    pub stage: u32,
    /// Worker class name, for humans.
    pub name: String,
    /// Where a worker process finds the stage's code, opaque to the agent: for Python,
    /// `module:qualname`.
    pub worker: String,
    /// Worker processes this agent runs for the stage.
    pub num: NonZeroU32,
    pub max_batch_size: NonZeroU32,
    /// Longest wait for a batch to fill, measured from its first item.
    pub max_wait_ms: u64,
    /// Longest one batch may run before its worker is killed; 0 means only the items'
    /// own deadlines bound it.
    #[serde(default)]
    pub timeout_ms: u64,
    /// One environment dict per worker process (e.g. GPU pinning).
    #[serde(default)]
    pub env: Option<Vec<BTreeMap<String, String>>>,
    /// Media type of the last stage's output.
    #[serde(default = "default_mime")]
    pub mime: String,
}

fn default_mime() -> String {
    "application/json".to_owned()
}

impl StageSpec {
    /// The place this stage was configured at: its home, where its queue is named.
    pub fn at(&self) -> StageAt {
        StageAt {
            route: self.route.clone(),
            stage: self.stage,
        }
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// The stage's own bound on one batch; `None` when only the items' deadlines bound it.
    pub fn batch_timeout(&self) -> Option<Duration> {
        (self.timeout_ms > 0).then(|| Duration::from_millis(self.timeout_ms))
    }

    /// The environment of worker `worker_id` (1-based), if the launcher gave one.
    pub fn worker_env(&self, worker_id: u32) -> Option<&BTreeMap<String, String>> {
        let index = usize::try_from(worker_id).ok()?.checked_sub(1)?;
        self.env.as_ref()?.get(index)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a valid agent config: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
}

impl AgentConfig {
    /// Reads, parses and validates the document at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates one document.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let config: AgentConfig = serde_json::from_slice(json)?;
        config.validate()?;
        Ok(config)
    }

    /// What serde cannot check: routes that make valid and distinct NATS names, stages
    /// inside their route, one env entry per worker.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.worker_cmd.is_empty() {
            return invalid("worker_cmd is empty".into());
        }
        let mut slugs: BTreeMap<String, &str> = BTreeMap::new();
        for route in &self.routes {
            let slug = route_slug(&route.route).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if let Some(other) = slugs.insert(slug.clone(), &route.route) {
                return invalid(format!(
                    "routes {other} and {} share the NATS name {slug}: rename one",
                    route.route
                ));
            }
        }
        for s in &self.stages {
            let Some(route) = self.route(&s.route) else {
                return invalid(format!("stage {} names unknown route {}", s.stage, s.route));
            };
            if s.stage as usize >= route.names.len() {
                return invalid(format!("{} has no stage {}", s.route, s.stage));
            }
            if let Some(env) = &s.env {
                if env.len() != s.num.get() as usize {
                    return invalid(format!(
                        "{} stage {}: env has {} entries for {} workers",
                        s.route,
                        s.stage,
                        env.len(),
                        s.num
                    ));
                }
            }
        }
        self.validate_queues()
    }

    pub fn route(&self, route: &str) -> Option<&RouteSpec> {
        self.routes.iter().find(|r| r.route == route)
    }

    /// Every place the hosted stage `spec` serves, its home first, then in route order:
    /// one place unless its `Runtime` is shared by several routes.
    pub fn places(&self, spec: &StageSpec) -> Vec<Place> {
        let home = spec.at();
        let mut places = Vec::new();
        for route in &self.routes {
            let stages_in_route = route.names.len() as u32;
            for stage in 0..stages_in_route {
                if route.queue(stage) == home {
                    let at = StageAt {
                        route: route.route.clone(),
                        stage,
                    };
                    places.push(Place {
                        at,
                        stages_in_route,
                    });
                }
            }
        }
        places.sort_by_key(|p| p.at != home);
        places
    }

    /// Shared queues: one entry per stage, each naming an existing place that is its own
    /// home and runs the same worker class.
    fn validate_queues(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for route in &self.routes {
            if route.queues.is_empty() {
                continue;
            }
            if route.queues.len() != route.names.len() {
                return invalid(format!(
                    "{}: queues has {} entries for {} stages",
                    route.route,
                    route.queues.len(),
                    route.names.len()
                ));
            }
            for (stage, home) in route.queues.iter().enumerate() {
                let Some(owner) = self.route(&home.route) else {
                    return invalid(format!(
                        "{} stage {stage}: its queue names unknown route {}",
                        route.route, home.route
                    ));
                };
                let (Some(name), Some(ours)) =
                    (owner.names.get(home.stage as usize), route.names.get(stage))
                else {
                    return invalid(format!(
                        "{} stage {stage}: its queue names {} stage {}, which does not exist",
                        route.route, home.route, home.stage
                    ));
                };
                if owner.queue(home.stage) != *home {
                    return invalid(format!(
                        "{} stage {stage}: its queue {} stage {} is itself served by another",
                        route.route, home.route, home.stage
                    ));
                }
                if name != ours {
                    return invalid(format!(
                        "{} stage {stage} ({ours}) shares the queue of {} stage {} ({name}): a shared stage runs one worker class",
                        route.route, home.route, home.stage
                    ));
                }
            }
        }
        for s in &self.stages {
            let home = self.route(&s.route).map(|r| r.queue(s.stage));
            if home.as_ref().is_some_and(|home| *home != s.at()) {
                let home = home.expect("checked");
                return invalid(format!(
                    "{} stage {} is served by the queue of {} stage {}: host that one instead",
                    s.route, s.stage, home.route, home.stage
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(mime: &str, schema: serde_json::Value) -> crate::BodyType {
        crate::BodyType {
            mime: mime.into(),
            schema,
        }
    }

    const GOLDEN: &str = include_str!("../../tests/golden/agent_config.json");

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn golden() -> AgentConfig {
        AgentConfig::from_json(GOLDEN.as_bytes()).unwrap()
    }

    #[test]
    fn golden_config_has_every_field() {
        let gpu = |n: &str| BTreeMap::from([("CUDA_VISIBLE_DEVICES".to_owned(), n.to_owned())]);
        let embed = RouteSpec {
            route: "/v1/embed".into(),
            names: vec!["Embed".into()],
            types: Some(crate::RouteTypes {
                request: body(
                    "application/msgpack",
                    serde_json::json!({"$ref": "#/components/schemas/Text"}),
                ),
                response: body(
                    "application/msgpack",
                    serde_json::json!({"type": "array", "items": {"type": "number"}}),
                ),
                components: serde_json::json!({"Text": {
                    "title": "Text",
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"]
                }})
                .as_object()
                .unwrap()
                .clone(),
            }),
            streams: false,
            queues: Vec::new(),
        };
        let expected = AgentConfig {
            worker_cmd: [
                "/usr/bin/python3",
                "-m",
                "natserve._worker_main",
                "/srv/app.py",
                "--port",
                "8000",
            ]
            .map(String::from)
            .to_vec(),
            routes: vec![
                RouteSpec {
                    route: "/inference".into(),
                    names: vec!["Preprocess".into(), "Inference".into()],
                    types: Some(crate::RouteTypes {
                        request: body("application/json", serde_json::json!({})),
                        response: body("application/json", serde_json::json!({})),
                        components: Default::default(),
                    }),
                    streams: false,
                    queues: Vec::new(),
                },
                embed.clone(),
                RouteSpec {
                    route: "/v2/embed".into(),
                    queues: vec![StageAt {
                        route: "/v1/embed".into(),
                        stage: 0,
                    }],
                    ..embed.clone()
                },
                RouteSpec {
                    route: "/v1/chat".into(),
                    names: vec!["Chat".into()],
                    types: Some(crate::RouteTypes {
                        request: body("application/json", serde_json::json!({})),
                        response: body("text/event-stream", serde_json::json!({})),
                        components: Default::default(),
                    }),
                    streams: true,
                    queues: Vec::new(),
                },
            ],
            stages: vec![
                StageSpec {
                    route: "/inference".into(),
                    stage: 0,
                    name: "Preprocess".into(),
                    worker: "__main__:Preprocess".into(),
                    num: nz(1),
                    max_batch_size: nz(1),
                    max_wait_ms: 0,
                    timeout_ms: 0,
                    env: None,
                    mime: "application/json".into(),
                },
                StageSpec {
                    route: "/inference".into(),
                    stage: 1,
                    name: "Inference".into(),
                    worker: "__main__:Inference".into(),
                    num: nz(2),
                    max_batch_size: nz(8),
                    max_wait_ms: 10,
                    timeout_ms: 500,
                    env: Some(vec![gpu("0"), gpu("1")]),
                    mime: "application/json".into(),
                },
                StageSpec {
                    route: "/v1/embed".into(),
                    stage: 0,
                    name: "Embed".into(),
                    worker: "models.text:Embed".into(),
                    num: nz(1),
                    max_batch_size: nz(16),
                    max_wait_ms: 5,
                    timeout_ms: 0,
                    env: None,
                    mime: "application/msgpack".into(),
                },
                StageSpec {
                    route: "/v1/chat".into(),
                    stage: 0,
                    name: "Chat".into(),
                    worker: "__main__:Chat".into(),
                    num: nz(1),
                    max_batch_size: nz(4),
                    max_wait_ms: 0,
                    timeout_ms: 0,
                    env: None,
                    mime: "text/event-stream".into(),
                },
            ],
        };
        assert_eq!(golden(), expected);
    }

    #[test]
    fn golden_config_round_trips() {
        let config = golden();
        let json = serde_json::to_vec(&config).unwrap();
        assert_eq!(AgentConfig::from_json(&json).unwrap(), config);
        // The serialized keys are the golden file's keys, not just a self-consistent set.
        let ours: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(GOLDEN).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_renamed_key_is_refused() {
        for (from, to) in [
            ("\"max_batch_size\"", "\"max_batch\""),
            ("\"worker_cmd\"", "\"cmd\""),
            ("\"names\"", "\"workers\""),
            ("\"timeout_ms\"", "\"timeout\""),
        ] {
            let renamed = GOLDEN.replacen(from, to, 1);
            assert!(
                AgentConfig::from_json(renamed.as_bytes()).is_err(),
                "{from} -> {to} was accepted"
            );
        }
    }

    #[test]
    fn zero_workers_or_batch_size_is_refused_by_the_type() {
        for key in ["\"num\": 1", "\"max_batch_size\": 1"] {
            let zero = GOLDEN.replacen(key, &key.replace('1', "0"), 1);
            let err = AgentConfig::from_json(zero.as_bytes()).unwrap_err();
            assert!(matches!(err, ConfigError::Parse(_)), "{key}: {err}");
        }
    }

    #[test]
    fn rejects_an_env_list_of_the_wrong_length() {
        let mut c = golden();
        c.stages[1].num = nz(3);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("env has 2 entries for 3 workers"), "{err}");
    }

    #[test]
    fn rejects_a_stage_outside_its_route() {
        let mut c = golden();
        c.stages[0].stage = 2;
        assert!(c.validate().is_err());
        c.stages[0].route = "/nowhere".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn rejects_routes_sharing_a_slug_or_invalid_ones() {
        let mut c = golden();
        c.routes.push(RouteSpec {
            route: "/v1_embed".into(),
            names: vec!["Other".into()],
            types: None,
            streams: false,
            queues: Vec::new(),
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("/v1/embed") && err.contains("/v1_embed"),
            "{err}"
        );
        let mut c = golden();
        c.routes[1].route = "/v1/embed!".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn worker_env_is_per_worker() {
        let c = golden();
        assert_eq!(
            c.stages[1].worker_env(2).unwrap()["CUDA_VISIBLE_DEVICES"],
            "1"
        );
        assert!(c.stages[1].worker_env(0).is_none());
        assert!(c.stages[0].worker_env(1).is_none());
    }

    #[test]
    fn a_shared_stage_serves_every_place_its_home_first() {
        let c = golden();
        let at = |route: &str, stage| StageAt {
            route: route.into(),
            stage,
        };
        let places: Vec<StageAt> = c.places(&c.stages[2]).into_iter().map(|p| p.at).collect();
        assert_eq!(places, [at("/v1/embed", 0), at("/v2/embed", 0)]);
        assert_eq!(c.places(&c.stages[1]).len(), 1);
        assert!(c.places(&c.stages[1])[0].is_last() && !c.places(&c.stages[1])[0].is_first());
    }

    #[test]
    fn rejects_shared_queues_that_do_not_add_up() {
        let shared = |c: &mut AgentConfig| c.routes[2].queues[0].clone();
        // A queue naming a stage that does not exist.
        let mut c = golden();
        c.routes[2].queues[0].stage = 3;
        assert!(c.validate().is_err());
        // A queue whose home is itself served by another: no chains.
        let mut c = golden();
        let home = shared(&mut c);
        c.routes[1].queues = vec![StageAt {
            route: "/v2/embed".into(),
            stage: 0,
        }];
        c.routes[2].queues = vec![home];
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("served by another") || err.contains("host that one"),
            "{err}"
        );
        // A different worker class on the shared queue.
        let mut c = golden();
        c.routes[2].names = vec!["Other".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("one worker class"), "{err}");
        // One entry per stage.
        let mut c = golden();
        c.routes[2].queues.push(StageAt {
            route: "/v1/embed".into(),
            stage: 0,
        });
        assert!(c.validate().is_err());
        // Hosting a place that is not its queue's home.
        let mut c = golden();
        c.stages[2].route = "/v2/embed".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("host that one instead"), "{err}");
    }
}
