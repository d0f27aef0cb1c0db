//! The agent's flags, and the settings `run` takes, built from them. The pipeline the
//! launcher hands over (`--config`) is `natserve_protocol::AgentConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;
use clap::{Parser, ValueEnum};
use natserve_protocol::logs::LogFormat;
use natserve_protocol::QueueConfig;
use natserve_scheduler::Prefetch;

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
    /// per worker that another agent could have taken. `auto`: only while a stage's
    /// batches take at most ten pull round trips (measured); `on` (or true): always;
    /// `off` (or false): pull only for idle workers.
    #[arg(long, env = "NATSERVE_PREFETCH", default_value = "auto", value_name = "auto|on|off", value_parser = parse_prefetch)]
    pub prefetch: Prefetch,
    /// Hand a result to the next stage of its route directly when this agent hosts that
    /// stage and its workers have room, instead of through the stage's stream (where
    /// other agents would share it). The input is acked only once the next stage is done
    /// with it, so a dead agent's request runs again from the earlier stage. `off` sends
    /// every hand-off through the stream.
    #[arg(long, env = "NATSERVE_LOCAL_HANDOFFS", default_value = "on", value_name = "on|off", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub local_handoffs: bool,
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
    /// Log lines as text, or as one JSON object per line; the worker processes are told
    /// the same (`NATSERVE_LOG_FORMAT`).
    #[arg(long, env = natserve_protocol::logs::LOG_FORMAT_ENV, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    pub prefetch: Prefetch,
    /// Whether a stage hands results to the next one on this agent without the stream.
    pub local_handoffs: bool,
    /// The log format the worker processes are told to use.
    pub log_format: LogFormat,
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
            prefetch: Prefetch::Auto,
            local_handoffs: true,
            log_format: LogFormat::Text,
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
            local_handoffs: args.local_handoffs,
            log_format: args.log_format,
        }
    }
}

/// `--prefetch`: `auto`, or what clap's boolish parser takes (`on`/`off`, `true`/`false`,
/// `yes`/`no`, `1`/`0`), as `NATSERVE_PREFETCH=1` always meant on.
fn parse_prefetch(value: &str) -> Result<Prefetch, String> {
    if value.eq_ignore_ascii_case("auto") {
        return Ok(Prefetch::Auto);
    }
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "y" | "1" => Ok(Prefetch::On),
        "off" | "false" | "no" | "n" | "0" => Ok(Prefetch::Off),
        _ => Err("expected auto, on or off".to_owned()),
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
        assert_eq!(s.prefetch, Prefetch::Auto);
        assert_eq!(defaults.queue.replicas, 1);
    }

    #[test]
    fn prefetch_takes_auto_and_booleans() {
        for (given, mode) in [
            ("auto", Prefetch::Auto),
            ("on", Prefetch::On),
            ("true", Prefetch::On),
            ("1", Prefetch::On),
            ("off", Prefetch::Off),
            ("false", Prefetch::Off),
            ("0", Prefetch::Off),
        ] {
            let args = Args::try_parse_from([
                "natserve-agent",
                "--config",
                "/x.json",
                "--prefetch",
                given,
            ])
            .unwrap();
            assert_eq!(args.prefetch, mode, "{given}");
        }
        assert!(
            Args::try_parse_from(["natserve-agent", "--config", "/x", "--prefetch", "maybe"])
                .is_err()
        );
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
