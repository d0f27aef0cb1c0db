//! Idle worker connections of one stage, and the counters the agent's heartbeat reports.
//!
//! A [`WorkerConn`] is in exactly one place: the pool (idle) or a running batch. Dropping
//! it retires the worker: its supervisor terminates the process and starts a fresh one,
//! so a worker that failed a batch is never handed work again.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use natserve_protocol::{Connection, ConnectionError, Frame, ItemResult};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker connection failed: {0}")]
    Connection(#[from] ConnectionError),
    #[error("worker closed its socket")]
    Closed,
    #[error("worker answered {0}")]
    Protocol(String),
}

/// Live counts of a stage's workers on this agent.
#[derive(Debug, Default)]
pub struct WorkerStats {
    ready: AtomicU32,
    free: AtomicU32,
}

impl WorkerStats {
    pub fn ready(&self) -> u32 {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn free(&self) -> u32 {
        self.free.load(Ordering::Relaxed)
    }

    pub fn worker_up(&self) {
        self.ready.fetch_add(1, Ordering::Relaxed);
    }

    pub fn worker_down(&self) {
        self.ready.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A ready Python worker process, reached over its Unix socket.
pub struct WorkerConn {
    label: String,
    conn: Connection<UnixStream>,
    alive: Arc<AtomicBool>,
    retire: CancellationToken,
    next_batch: u64,
}

impl WorkerConn {
    /// `alive` is cleared by the supervisor when the process exits; `retire` is cancelled
    /// when this connection is dropped, telling the supervisor to replace the process.
    pub fn new(
        label: String,
        conn: Connection<UnixStream>,
        alive: Arc<AtomicBool>,
        retire: CancellationToken,
    ) -> Self {
        Self {
            label,
            conn,
            alive,
            retire,
            next_batch: 0,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Runs one batch: one result per item, in order, or an error that retires the worker.
    pub async fn run(&mut self, items: Vec<Bytes>) -> Result<Vec<ItemResult>, WorkerError> {
        self.next_batch += 1;
        let id = self.next_batch;
        let count = items.len();
        self.conn.write_frame(&Frame::Batch { id, items }).await?;
        match self.conn.read_frame().await? {
            None => Err(WorkerError::Closed),
            Some(Frame::Results { id: got, items }) if got == id && items.len() == count => {
                Ok(items)
            }
            Some(Frame::Results { id: got, items }) => Err(WorkerError::Protocol(format!(
                "batch {got} with {} results for batch {id} of {count} items",
                items.len()
            ))),
            Some(other) => Err(WorkerError::Protocol(format!("{other:?} to a batch"))),
        }
    }
}

impl Drop for WorkerConn {
    fn drop(&mut self) {
        self.retire.cancel();
    }
}

/// The receiving side, owned by the stage's scheduler.
pub struct WorkerPool {
    rx: mpsc::UnboundedReceiver<WorkerConn>,
    tx: PoolSender,
}

/// The sending side: supervisors add fresh workers, batches return idle ones.
#[derive(Clone)]
pub struct PoolSender {
    tx: mpsc::UnboundedSender<WorkerConn>,
    stats: Arc<WorkerStats>,
}

impl PoolSender {
    pub fn put(&self, worker: WorkerConn) {
        self.stats.free.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(worker)) = self.tx.send(worker) {
            // The scheduler is gone (shutdown): dropping retires the worker.
            self.stats.free.fetch_sub(1, Ordering::Relaxed);
            drop(worker);
        }
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }
}

impl WorkerPool {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            rx,
            tx: PoolSender {
                tx,
                stats: Arc::new(WorkerStats::default()),
            },
        }
    }

    pub fn sender(&self) -> PoolSender {
        self.tx.clone()
    }

    /// Waits for an idle worker whose process is still alive.
    pub async fn take(&mut self) -> Option<WorkerConn> {
        loop {
            let worker = self.rx.recv().await?;
            self.tx.stats.free.fetch_sub(1, Ordering::Relaxed);
            if worker.is_alive() {
                return Some(worker);
            }
        }
    }
}

impl Default for WorkerPool {
    fn default() -> Self {
        Self::new()
    }
}
