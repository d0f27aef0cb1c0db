//! `natserve-agent`: parse flags, load the pipeline, run until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use natserve_agent::{run, AgentSettings, Args};
use natserve_protocol::AgentConfig;
use tracing_subscriber::EnvFilter;

/// glibc's malloc was a sixth of the ingress's CPU under load; mimalloc took the CPU
/// a request costs the ingress and the agent down a tenth (`tests/bench/census.py`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.render().to_string();
            eprintln!(
                "natserve-agent: {}",
                text.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(64);
        }
    };
    let filter = match EnvFilter::try_new(natserve_protocol::log_directives(&args.log_level)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "natserve-agent: error: --log-level {:?}: {e}",
                args.log_level
            );
            return ExitCode::from(64);
        }
    };
    natserve_protocol::logs::init(filter, args.log_format);
    let config = match AgentConfig::load(&args.config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("natserve-agent: error: --config: {e}");
            return ExitCode::from(64);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let settings = AgentSettings::from(&args);
    match runtime.block_on(run(settings, config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
