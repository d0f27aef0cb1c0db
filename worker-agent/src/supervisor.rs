//! Keeps one Python worker process alive: starts `worker_cmd` with its socket and
//! environment (`NATSERVE_WORKER_SPEC`, `NATSERVE_WORKER_STAGES`, `NATSERVE_WORKER_ID`,
//! `NATSERVE_SOCKET`, `NATSERVE_LOG_FORMAT`, plus the stage's per-worker `env`), accepts its one connection,
//! waits for READY, hands the connection to the stage's pool, and replaces the process
//! when it exits, crashes, or is retired because its connection was dropped (a failed or
//! hung batch, or a worker found dead). Restarts back off exponentially unless the
//! process had lived long enough to count as healthy.
//!
//! Two tokens order the shutdown: `draining` stops restarts (batches may still finish),
//! `stop` terminates the process (SIGTERM, then SIGKILL after a grace period). On Linux
//! the kernel also kills the process if the agent itself dies (PR_SET_PDEATHSIG).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use natserve_protocol::logs::{LogFormat, LOG_FORMAT_ENV};
use natserve_protocol::StageSpec;
use natserve_protocol::{frame::DEFAULT_MAX_FRAME, Connection, Frame};
use natserve_scheduler::{PoolSender, WorkerConn};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A worker that lived this long is healthy again: its next restart is immediate.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
const TERM_GRACE: Duration = Duration::from_secs(5);

/// One worker process of one stage.
pub struct Slot {
    pub spec: Arc<StageSpec>,
    /// Number of stages in the spec's route: the worker decodes HTTP bodies at stage 0 and
    /// encodes responses at the last.
    pub stages_in_route: u32,
    /// 1-based within the stage on this agent.
    pub worker_id: u32,
    pub worker_cmd: Arc<Vec<String>>,
    pub socket: PathBuf,
    pub pool: PoolSender,
    pub log_format: LogFormat,
    /// Told when this worker becomes ready or goes away, so the agent's record says so at
    /// once.
    pub changed: Arc<Notify>,
}

impl Slot {
    fn label(&self) -> String {
        format!("{}:{}:{}", self.spec.route, self.spec.stage, self.worker_id)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.worker_cmd[0]);
        cmd.args(&self.worker_cmd[1..])
            .env(
                "NATSERVE_WORKER_SPEC",
                serde_json::to_string(&*self.spec).expect("a stage spec serializes"),
            )
            .env("NATSERVE_WORKER_STAGES", self.stages_in_route.to_string())
            .env("NATSERVE_WORKER_ID", self.worker_id.to_string())
            .env("NATSERVE_SOCKET", &self.socket)
            .env(LOG_FORMAT_ENV, self.log_format.as_str())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(env) = self.spec.worker_env(self.worker_id) {
            cmd.envs(env);
        }
        #[cfg(target_os = "linux")]
        die_with_parent(&mut cmd);
        cmd
    }
}

/// Makes the kernel kill the worker if the agent dies without cleaning up.
#[cfg(target_os = "linux")]
// The one place the agent needs `unsafe`: std marks every `pre_exec` hook unsafe, as it
// runs between fork and exec. This one only calls prctl(2), which is async-signal-safe,
// allocates nothing and touches no memory of the parent.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: see above; the closure captures nothing.
    unsafe {
        cmd.pre_exec(|| {
            // Best effort, as before: a worker is still supervised without it.
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            Ok(())
        });
    }
}

enum Ended {
    /// Shut down on purpose.
    Stopped,
    /// Exited or failed; restart it.
    Lost(String),
}

pub async fn supervise(slot: Slot, draining: CancellationToken, stop: CancellationToken) {
    let label = slot.label();
    let mut backoff = MIN_BACKOFF;
    while !draining.is_cancelled() {
        let started = Instant::now();
        match run_once(&slot, &label, &draining, &stop).await {
            Ended::Stopped => break,
            Ended::Lost(reason) => warn!(worker = %label, reason = %reason, "worker lost"),
        }
        if started.elapsed() > HEALTHY_AFTER {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = draining.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    let _ = std::fs::remove_file(&slot.socket);
}

async fn run_once(
    slot: &Slot,
    label: &str,
    draining: &CancellationToken,
    stop: &CancellationToken,
) -> Ended {
    let _ = std::fs::remove_file(&slot.socket);
    let listener = match UnixListener::bind(&slot.socket) {
        Ok(l) => l,
        Err(e) => return Ended::Lost(format!("cannot listen on {}: {e}", slot.socket.display())),
    };
    let mut child = match slot.command().spawn() {
        Ok(c) => c,
        Err(e) => {
            error!(worker = %label, cmd = ?slot.worker_cmd, error = %e, "cannot start worker process");
            return Ended::Lost(e.to_string());
        }
    };
    let pid = child.id().unwrap_or(0);
    let (conn, (reads_ids, reads_edges)) = tokio::select! {
        ready = accept_ready(&listener) => match ready {
            Ok(ready) => ready,
            Err(reason) => {
                terminate(&mut child).await;
                return Ended::Lost(reason);
            }
        },
        status = child.wait() => {
            return Ended::Lost(format!("exited before it was ready ({})", describe(status)));
        }
        _ = stop.cancelled() => {
            terminate(&mut child).await;
            return Ended::Stopped;
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&slot.socket);

    let stats = slot.pool.stats().clone();
    stats.worker_up();
    slot.changed.notify_one();
    info!(worker = %label, pid, "worker ready");
    let alive = Arc::new(AtomicBool::new(true));
    let retire = CancellationToken::new();
    slot.pool.put(
        WorkerConn::new(label.to_owned(), conn, alive.clone(), retire.clone())
            .with_ids(reads_ids)
            .with_edges(reads_edges),
    );
    let ended = tokio::select! {
        status = child.wait() => Ended::Lost(format!("exited ({})", describe(status))),
        _ = retire.cancelled() => {
            alive.store(false, Ordering::Release);
            terminate(&mut child).await;
            if draining.is_cancelled() {
                Ended::Stopped // idle at shutdown: its pool is gone
            } else {
                Ended::Lost("retired after a failed batch".into())
            }
        }
        _ = stop.cancelled() => {
            alive.store(false, Ordering::Release);
            terminate(&mut child).await;
            Ended::Stopped
        }
    };
    alive.store(false, Ordering::Release);
    stats.worker_down();
    slot.changed.notify_one();
    ended
}

/// Waits for the worker to connect and finish loading (its READY frame).
/// The connection, and whether the worker reads batches with ids (BATCH kind 6) and
/// with edges (kind 7).
async fn accept_ready(
    listener: &UnixListener,
) -> Result<(Connection<tokio::net::UnixStream>, (bool, bool)), String> {
    let (stream, _) = listener
        .accept()
        .await
        .map_err(|e| format!("accept failed: {e}"))?;
    let mut conn = Connection::new(stream, DEFAULT_MAX_FRAME);
    match conn.read_frame().await {
        Ok(Some(Frame::Ready {
            reads_ids,
            reads_edges,
            ..
        })) => Ok((conn, (reads_ids, reads_edges))),
        Ok(Some(other)) => Err(format!("sent {other:?} instead of READY")),
        Ok(None) => Err("closed its socket before READY".into()),
        Err(e) => Err(format!("broke protocol before READY: {e}")),
    }
}

/// SIGTERM, then SIGKILL if the process is still there after a grace period.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // A pid we own and have not reaped yet, so it cannot name another process.
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(TERM_GRACE, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}
