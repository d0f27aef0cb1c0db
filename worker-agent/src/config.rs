//! The agent's flags, and the settings `run` takes, built from them. The pipeline the
//! launcher hands over (`--config`) is `natserve_protocol::AgentConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;
use clap::{Parser, ValueEnum};
use natserve_protocol::QueueConfig;

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
    /// On SIGTERM, how long running batches may take to finish. The agent exits within
    /// this plus 2.5 s, even with NATS unreachable, plus its workers' own exit on SIGTERM.
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
    /// Servers of a JetStream cluster that keep a copy of every stream and bucket natserve
    /// makes (1 to 5); a stream found with fewer is raised, never lowered.
    #[arg(long, env = "NATSERVE_REPLICAS", default_value_t = 1, value_parser = replicas_parser())]
    pub replicas: usize,
    /// Log filter: error, warn, info, debug, trace.
    #[arg(long, env = "NATSERVE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// `--replicas`: 1 to [`natserve_protocol::replicas::MAX_REPLICAS`].
pub fn replicas_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new()
        .range(1..=natserve_protocol::replicas::MAX_REPLICAS as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Storage {
    Memory,
    File,
}

/// What `run` needs to know besides the pipeline: [`Args`] as values, or whatever a
/// test or an embedding program builds.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub nats: String,
    /// Credentials and TLS beyond what the URL carries.
    pub nats_security: natserve_protocol::nats::NatsSecurity,
    pub namespace: String,
    /// `None`: a fresh temporary directory, removed when the agent stops.
    pub socket_dir: Option<PathBuf>,
    pub metrics_address: Option<SocketAddr>,
    pub heartbeat: Duration,
    /// On shutdown, how long running batches may take to finish.
    pub grace: Duration,
    pub queue: QueueConfig,
    pub prefetch: bool,
}

impl AgentSettings {
    /// Settings with the flags' defaults, for `namespace` on the server at `nats`.
    pub fn new(nats: &str, namespace: &str) -> Self {
        Self {
            nats: nats.to_owned(),
            nats_security: natserve_protocol::nats::NatsSecurity::default(),
            namespace: namespace.to_owned(),
            socket_dir: None,
            metrics_address: None,
            heartbeat: Duration::from_millis(2000),
            grace: Duration::from_millis(30_000),
            queue: QueueConfig {
                max_messages: 10_000,
                storage: StorageType::Memory,
                replicas: 1,
            },
            prefetch: false,
        }
    }
}

impl From<&Args> for AgentSettings {
    fn from(args: &Args) -> Self {
        Self {
            nats: args.nats.clone(),
            nats_security: args.nats_security.clone(),
            namespace: args.namespace.clone(),
            socket_dir: args.socket_dir.clone(),
            metrics_address: args.metrics_address,
            heartbeat: Duration::from_millis(args.heartbeat_ms),
            grace: Duration::from_millis(args.grace_ms),
            queue: QueueConfig {
                max_messages: args.max_queue,
                storage: match args.storage {
                    Storage::Memory => StorageType::Memory,
                    Storage::File => StorageType::File,
                },
                replicas: args.replicas,
            },
            prefetch: args.prefetch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_flags() {
        let args = Args::try_parse_from([
            "natserve-agent",
            "--config",
            "/x.json",
            "--agent-grace-ms",
            "1500",
            "--storage",
            "file",
            "--max-queue",
            "7",
            "--replicas",
            "3",
        ])
        .unwrap();
        let s = AgentSettings::from(&args);
        assert_eq!(s.grace, Duration::from_millis(1500));
        assert_eq!(s.queue.max_messages, 7);
        assert_eq!(s.queue.storage, StorageType::File);
        assert_eq!(s.queue.replicas, 3);
        let defaults = AgentSettings::new(&args.nats, &args.namespace);
        assert_eq!(s.heartbeat, defaults.heartbeat);
        assert!(!s.prefetch);
        assert_eq!(defaults.queue.replicas, 1);
    }

    #[test]
    fn replicas_are_one_to_five() {
        let parse = |n: &str| {
            Args::try_parse_from(["natserve-agent", "--config", "/x.json", "--replicas", n])
        };
        assert_eq!(parse("5").unwrap().replicas, 5);
        for bad in ["0", "6", "three"] {
            let err = parse(bad).unwrap_err();
            assert!(err.to_string().contains("--replicas"), "{err}");
        }
    }
}
