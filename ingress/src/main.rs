//! `natserve-ingress`: parse flags, bind, and run until SIGINT or SIGTERM.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use natserve_ingress::{run, Config, Listener};
use natserve_protocol::logs::LogFormat;
use natserve_protocol::nats::NatsSecurity;
use tracing_subscriber::EnvFilter;

/// glibc's malloc was a sixth of the ingress's CPU under load; mimalloc took the CPU
/// a request costs the ingress and the agent down a tenth (`tests/bench/census.py`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a bad flag or environment value (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// natserve's HTTP edge: forwards each request to its pipeline through NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "natserve-ingress", version)]
struct Cli {
    /// NATS server URL (several: comma-separated); a user and password
    /// (nats://user:pw@host:4222) or a token (nats://token@host:4222) in it are used.
    #[arg(long, env = "NATSERVE_NATS", default_value = Config::DEFAULT_NATS_URL, value_parser = parse_nats, hide_env_values = true)]
    nats: String,
    #[command(flatten)]
    nats_security: NatsSecurity,
    /// Deployment namespace: letters, digits, '_' and '-'.
    #[arg(long, env = "NATSERVE_NAMESPACE", default_value = Config::DEFAULT_NAMESPACE, value_parser = parse_namespace)]
    namespace: String,
    /// Address to listen on.
    #[arg(long, env = "NATSERVE_ADDRESS", default_value = "0.0.0.0")]
    address: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "NATSERVE_PORT", default_value_t = 8000)]
    port: u16,
    /// End-to-end deadline of a request, in milliseconds (Mosec's `--timeout`, same unit).
    #[arg(long = "timeout", env = "NATSERVE_TIMEOUT", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "NATSERVE_MAX_BODY_SIZE", default_value_t = Config::DEFAULT_MAX_BODY_SIZE as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_body_size: u64,
    /// How long shutdown waits for in-flight requests, in milliseconds.
    #[arg(
        long = "ingress-grace-ms",
        env = "NATSERVE_INGRESS_GRACE_MS",
        default_value_t = 10_000
    )]
    grace_ms: u64,
    /// Most HTTP connections open at once; more wait until one closes.
    #[arg(long, env = "NATSERVE_MAX_CONNECTIONS", default_value_t = Config::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: usize,
    /// Close a connection whose request headers are not in after this many ms (slowloris);
    /// idle keep-alive connections close after it too.
    #[arg(long, env = "NATSERVE_HEADER_READ_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_ms: u64,
    /// How long an asynchronous job's result is kept after it finished, in seconds.
    #[arg(long = "result-ttl-s", env = "NATSERVE_RESULT_TTL_S", default_value_t = Config::DEFAULT_RESULT_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=natserve_protocol::buckets::MAX_RESULT_TTL.as_secs()))]
    result_ttl_s: u64,
    /// Deadline of an asynchronous job (`Prefer: respond-async`), in milliseconds; at most
    /// --result-ttl-s.
    #[arg(long = "async-timeout-ms", env = "NATSERVE_ASYNC_TIMEOUT_MS", default_value_t = Config::DEFAULT_ASYNC_TIMEOUT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    async_timeout_ms: u64,
    /// Servers of a JetStream cluster that keep a copy of each bucket the ingress makes
    /// (1 to 5); a bucket found with fewer is raised, never lowered.
    #[arg(long, env = "NATSERVE_REPLICAS", default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=natserve_protocol::replicas::MAX_REPLICAS as u64))]
    replicas: usize,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives.
    #[arg(long, env = "NATSERVE_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    log_level: String,
    /// Log lines as text, or as one JSON object per line.
    #[arg(long, env = natserve_protocol::logs::LOG_FORMAT_ENV, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Take the port at start-up but accept connections only once `GET /` would answer
    /// 200 (every stage has a ready worker); until then a connect is refused. Off: the
    /// port answers at once, `GET /` with 503 until ready (what a load balancer's
    /// readiness probe expects).
    #[arg(long, env = "NATSERVE_LISTEN_WHEN_READY", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    listen_when_ready: bool,
}

fn parse_nats(s: &str) -> Result<String, String> {
    natserve_protocol::nats::parse_servers(s).map(|_| s.to_owned())
}

fn parse_namespace(s: &str) -> Result<String, String> {
    natserve_protocol::Names::new(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_log_level(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

impl Cli {
    fn config(&self) -> Config {
        Config {
            namespace: self.namespace.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            max_body_size: usize::try_from(self.max_body_size).unwrap_or(usize::MAX),
            grace: Duration::from_millis(self.grace_ms),
            max_connections: self.max_connections,
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            nats_security: self.nats_security.clone(),
            result_ttl: Duration::from_secs(self.result_ttl_s),
            async_timeout: Duration::from_millis(self.async_timeout_ms),
            replicas: self.replicas,
            ..Config::new(self.nats.clone())
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let line = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            // clap quotes a rejected value: a --nats URL may carry a password.
            eprintln!("{}", natserve_protocol::nats::redact(line));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.async_timeout_ms > cli.result_ttl_s.saturating_mul(1000) {
        eprintln!(
            "error: --async-timeout-ms ({}) must not exceed --result-ttl-s ({} s): a job's \
             pending record must outlive its deadline",
            cli.async_timeout_ms, cli.result_ttl_s
        );
        return ExitCode::from(EXIT_USAGE);
    }
    natserve_protocol::logs::init(
        EnvFilter::new(natserve_protocol::log_directives(&cli.log_level)),
        cli.log_format,
    );
    match serve(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "ingress failed");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(cli: Cli) -> anyhow::Result<()> {
    let address = SocketAddr::new(cli.address, cli.port);
    let listener = if cli.listen_when_ready {
        // Bound now, so a taken port fails at start-up, not once the workers are ready.
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(address)
            .with_context(|| format!("could not bind {address}"))?;
        Listener::WhenReady(socket)
    } else {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("could not listen on {address}"))?;
        Listener::Now(listener)
    };
    run(listener, cli.config(), shutdown_signal()).await?;
    Ok(())
}
