//! The agent's flags and the pipeline description the launcher hands it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use natserve_scheduler::StageSpec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "natserve-agent",
    version,
    about = "Runs this host's natserve workers: pulls stage work from NATS JetStream"
)]
pub struct Args {
    /// NATS server URL (several: comma-separated); a user and password
    /// (nats://user:pw@host:4222) or a token (nats://token@host:4222) in it are used.
    #[arg(
        long,
        env = "NATSERVE_NATS",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats: String,
    #[command(flatten)]
    pub nats_security: natserve_protocol::nats::NatsSecurity,
    /// Keeps deployments sharing one NATS server apart.
    #[arg(long, env = "NATSERVE_NAMESPACE", default_value = "natserve")]
    pub namespace: String,
    /// Pipeline description (JSON) written by the natserve launcher.
    #[arg(long, env = "NATSERVE_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Directory for the workers' Unix sockets (default: a fresh temporary directory).
    #[arg(long, env = "NATSERVE_SOCKET_DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Serve /metrics and /ready on this address (e.g. 0.0.0.0:9100).
    #[arg(long, env = "NATSERVE_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// How often the agent refreshes its registration.
    #[arg(long, env = "NATSERVE_HEARTBEAT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..))]
    pub heartbeat_ms: u64,
    /// On SIGTERM, how long running batches may take to finish.
    #[arg(
        long = "agent-grace-ms",
        env = "NATSERVE_AGENT_GRACE_MS",
        default_value_t = 30_000
    )]
    pub grace_ms: u64,
    /// Most requests a stage's queue holds before publishers get "queue full" (HTTP 429).
    #[arg(long, env = "NATSERVE_MAX_QUEUE", default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub max_queue: i64,
    /// Pull each worker's next batch while it runs the current one: more throughput when
    /// the broker round trip is a large part of a batch, at the cost of holding one batch
    /// per worker that another agent could have taken. Off: pull only for idle workers.
    #[arg(long, env = "NATSERVE_PREFETCH", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub prefetch: bool,
    /// Where stage queues are stored.
    #[arg(long, env = "NATSERVE_STORAGE", value_enum, default_value_t = Storage::Memory)]
    pub storage: Storage,
    /// Log filter: error, warn, info, debug, trace.
    #[arg(long, env = "NATSERVE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Storage {
    Memory,
    File,
}

impl Args {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
}

/// A route and the worker names of all its stages, whether or not this agent hosts them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    pub route: String,
    pub names: Vec<String>,
}

/// The pipeline description, as `docs/protocol.md` specifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Command that starts one worker process (the user's script, run again).
    pub worker_cmd: Vec<String>,
    pub routes: Vec<RouteSpec>,
    /// The stages this agent hosts.
    pub stages: Vec<StageSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid pipeline description: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Pipeline {
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let pipeline: Pipeline =
            serde_json::from_slice(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        pipeline.validate()?;
        Ok(pipeline)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.worker_cmd.is_empty() {
            return invalid("worker_cmd is empty".into());
        }
        for route in &self.routes {
            natserve_protocol::route_slug(&route.route)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        for s in &self.stages {
            let Some(route) = self.route(&s.route) else {
                return invalid(format!("stage {} names unknown route {}", s.stage, s.route));
            };
            if s.stage as usize >= route.names.len() {
                return invalid(format!("{} has no stage {}", s.route, s.stage));
            }
            if s.num == 0 || s.max_batch_size == 0 {
                return invalid(format!(
                    "{} stage {}: num and max_batch_size must be >= 1",
                    s.route, s.stage
                ));
            }
            if let Some(env) = &s.env {
                if env.len() != s.num as usize {
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
        Ok(())
    }

    pub fn route(&self, route: &str) -> Option<&RouteSpec> {
        self.routes.iter().find(|r| r.route == route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "worker_cmd": ["/usr/bin/python3", "/app/exp.py"],
      "routes": [{"route": "/inference", "names": ["Pre", "Infer"]}],
      "stages": [{"route": "/inference", "stage": 1, "name": "Infer",
                  "worker": "__main__:Infer", "num": 2,
                  "max_batch_size": 8, "max_wait_ms": 10, "timeout_ms": 0,
                  "env": [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}],
                  "mime": "application/json"}]
    }"#;

    #[test]
    fn parses_the_documented_format() {
        let p: Pipeline = serde_json::from_str(SAMPLE).unwrap();
        p.validate().unwrap();
        assert_eq!(p.stages[0].max_batch_size, 8);
        assert_eq!(p.route("/inference").unwrap().names.len(), 2);
    }

    #[test]
    fn rejects_an_env_list_of_the_wrong_length() {
        let mut p: Pipeline = serde_json::from_str(SAMPLE).unwrap();
        p.stages[0].num = 3;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("env has 2 entries for 3 workers"));
    }

    #[test]
    fn rejects_a_stage_outside_its_route() {
        let mut p: Pipeline = serde_json::from_str(SAMPLE).unwrap();
        p.stages[0].stage = 2;
        assert!(p.validate().is_err());
    }
}
