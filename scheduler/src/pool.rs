//! Idle worker connections of one stage, and the counters the agent's heartbeat reports.
//!
//! A [`WorkerConn`] is in exactly one place: the pool (idle), a pull loop waiting for
//! work for it, or a running batch. Dropping it retires the worker: its supervisor
//! terminates the process and starts a fresh one, so a worker that failed a batch is
//! never handed work again.
//!
//! Any number of pull loops take from one pool at once. The idle list sits behind a
//! plain mutex that is never held across an `.await`; a FIFO semaphore with one permit
//! per idle worker is what takers wait on, so they are served in the order they asked.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use natserve_protocol::{Connection, ConnectionError, Frame, ItemIds, ItemResult};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// What became of a batch whose worker failed, which decides what becomes of its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The batch never reached a live worker: another worker may run it as if nothing
    /// happened.
    NotDelivered,
    /// The worker took the batch and then died or broke protocol: the items may have run,
    /// or may be what killed it.
    LostMidBatch,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker process had exited before the batch was sent")]
    Exited,
    #[error("batch could not be sent: {0}")]
    Send(#[source] ConnectionError),
    #[error("worker connection failed mid-batch: {0}")]
    Receive(#[source] ConnectionError),
    #[error("worker closed its socket mid-batch")]
    Closed,
    #[error("worker answered {0}")]
    Protocol(String),
}

impl WorkerError {
    pub fn kind(&self) -> FailureKind {
        match self {
            WorkerError::Exited | WorkerError::Send(_) => FailureKind::NotDelivered,
            WorkerError::Receive(_) | WorkerError::Closed | WorkerError::Protocol(_) => {
                FailureKind::LostMidBatch
            }
        }
    }
}

/// One event a streaming worker sent for item `index` of the batch it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    pub index: u32,
    pub body: Bytes,
}

/// What a running batch exchanges with its worker besides the batch and its results:
/// stream events out (bounded, so a worker streaming faster than NATS takes them waits on
/// its socket), and the indices of items whose requester went away in.
pub struct BatchChannels {
    pub events: mpsc::Sender<StreamEvent>,
    pub cancels: mpsc::UnboundedReceiver<u32>,
}

/// Live counts of a stage's workers on this agent.
#[derive(Debug, Default)]
pub struct WorkerStats {
    ready: AtomicU32,
    busy: AtomicU32,
}

impl WorkerStats {
    pub fn ready(&self) -> u32 {
        self.ready.load(Ordering::Relaxed)
    }

    /// Ready workers not running a batch: idle in the pool or waiting in a pull loop for
    /// work, i.e. what this agent could start now.
    pub fn free(&self) -> u32 {
        self.ready()
            .saturating_sub(self.busy.load(Ordering::Relaxed))
    }

    pub fn worker_up(&self) {
        self.ready.fetch_add(1, Ordering::Relaxed);
    }

    pub fn worker_down(&self) {
        self.ready.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a batch as running until the returned guard is dropped.
    pub fn batch_running(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }
}

/// One running batch, as [`WorkerStats::free`] counts it.
pub struct BusyGuard(Arc<WorkerStats>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A ready Python worker process, reached over its Unix socket.
pub struct WorkerConn {
    label: String,
    conn: Connection<UnixStream>,
    alive: Arc<AtomicBool>,
    retire: CancellationToken,
    next_batch: u64,
    /// The worker said (in its READY) that it reads batches with ids.
    reads_ids: bool,
    /// ... and batches with each item's edge (BATCH kind 7).
    reads_edges: bool,
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
            reads_ids: false,
            reads_edges: false,
        }
    }

    /// Whether the worker reads batches with ids (BATCH kind 6): only then are they sent.
    pub fn with_ids(mut self, reads_ids: bool) -> Self {
        self.reads_ids = reads_ids;
        self
    }

    /// Whether the worker reads batches with each item's edge (BATCH kind 7): only then
    /// are they sent. A worker that does not read them treats every item as standing
    /// where its own stage does.
    pub fn with_edges(mut self, reads_edges: bool) -> Self {
        self.reads_edges = reads_edges;
        self
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Runs one batch: one result per item, in order, or an error that retires the worker
    /// and says whether the batch got to it ([`WorkerError::kind`]). Stream events are
    /// dropped and nothing is cancelled; see [`WorkerConn::run_with`].
    pub async fn run(&mut self, items: Vec<Bytes>) -> Result<Vec<ItemResult>, WorkerError> {
        let (events, mut dropped) = mpsc::channel(16);
        let (_cancel, cancels) = mpsc::unbounded_channel();
        let mut channels = BatchChannels { events, cancels };
        let run = self.run_with(items, Vec::new(), Vec::new(), &mut channels);
        tokio::pin!(run);
        loop {
            tokio::select! {
                done = &mut run => return done,
                _ = dropped.recv() => {}
            }
        }
    }

    /// [`WorkerConn::run`], telling the worker each item's ids (`ids`: one per item, or
    /// none) and edge (`edges`: one per item, or none; see [`crate::places`]), handing each `STREAM` frame to `channels.events` as it comes (all of them
    /// before this returns) and telling the worker of every index that arrives on
    /// `channels.cancels` with a `CANCEL` frame.
    pub async fn run_with(
        &mut self,
        items: Vec<Bytes>,
        ids: Vec<ItemIds>,
        edges: Vec<u8>,
        channels: &mut BatchChannels,
    ) -> Result<Vec<ItemResult>, WorkerError> {
        // A worker can die while idle, e.g. while its pull loop waits for work.
        if !self.is_alive() {
            return Err(WorkerError::Exited);
        }
        self.next_batch += 1;
        let id = self.next_batch;
        let count = items.len();
        let ids = if self.reads_ids { ids } else { Vec::new() };
        let edges = if self.reads_edges { edges } else { Vec::new() };
        // A write to a socket whose peer is gone fails (EPIPE): the batch stayed here.
        self.conn
            .write_frame(&Frame::Batch {
                id,
                items,
                ids,
                edges,
            })
            .await
            .map_err(WorkerError::Send)?;
        let mut cancels_open = true;
        loop {
            // `read_frame` is cancel-safe (what it read stays buffered), so a cancel to
            // forward may interrupt it.
            let frame = tokio::select! {
                frame = self.conn.read_frame() => frame.map_err(WorkerError::Receive)?,
                index = channels.cancels.recv(), if cancels_open => {
                    match index {
                        Some(index) => {
                            // A worker that died meanwhile shows up on the next read.
                            let _ = self.conn.write_frame(&Frame::Cancel { id, index }).await;
                        }
                        None => cancels_open = false,
                    }
                    continue;
                }
            };
            match frame {
                None => return Err(WorkerError::Closed),
                Some(Frame::Results { id: got, items }) if got == id && items.len() == count => {
                    return Ok(items)
                }
                Some(Frame::Results { id: got, items }) => {
                    return Err(WorkerError::Protocol(format!(
                        "batch {got} with {} results for batch {id} of {count} items",
                        items.len()
                    )))
                }
                Some(Frame::Stream {
                    id: got,
                    index,
                    body,
                }) if got == id && (index as usize) < count => {
                    // Whoever runs the batch stopped listening: the results still come.
                    let _ = channels.events.send(StreamEvent { index, body }).await;
                }
                Some(Frame::Stream { id: got, index, .. }) => {
                    return Err(WorkerError::Protocol(format!(
                        "stream event for item {index} of batch {got} while running batch {id} of {count} items"
                    )))
                }
                Some(other) => {
                    return Err(WorkerError::Protocol(format!("{other:?} to a batch")))
                }
            }
        }
    }
}

impl Drop for WorkerConn {
    fn drop(&mut self) {
        self.retire.cancel();
    }
}

#[derive(Default)]
struct Idle {
    workers: VecDeque<WorkerConn>,
    /// Set when the scheduler's side is dropped: workers put back after that retire.
    closed: bool,
}

struct Shared {
    idle: Mutex<Idle>,
    /// One permit per worker in `idle`.
    available: Semaphore,
    stats: Arc<WorkerStats>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The taking side, owned by the stage's scheduler and shared by its pull loops and
/// batches. Dropping it retires every idle worker.
pub struct WorkerPool {
    shared: Arc<Shared>,
}

/// The putting side: supervisors add fresh workers, batches return idle ones.
#[derive(Clone)]
pub struct PoolSender {
    shared: Arc<Shared>,
}

impl PoolSender {
    pub fn put(&self, worker: WorkerConn) {
        let mut idle = self.shared.lock();
        if idle.closed {
            drop(idle);
            drop(worker); // the scheduler is gone (shutdown): retire it
            return;
        }
        idle.workers.push_back(worker);
        drop(idle);
        self.shared.available.add_permits(1);
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.shared.stats
    }
}

impl WorkerPool {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                idle: Mutex::default(),
                available: Semaphore::new(0),
                stats: Arc::default(),
            }),
        }
    }

    pub fn sender(&self) -> PoolSender {
        PoolSender {
            shared: self.shared.clone(),
        }
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.shared.stats
    }

    /// Waits for an idle worker whose process is still alive. Cancel-safe: a taker
    /// dropped while waiting takes nothing.
    pub async fn take(&self) -> WorkerConn {
        loop {
            let permit = self
                .shared
                .available
                .acquire()
                .await
                .expect("the pool never closes its semaphore");
            permit.forget();
            let worker = self.shared.lock().workers.pop_front();
            match worker {
                Some(worker) if worker.is_alive() => return worker,
                // Dead while idle: dropping it tells its supervisor, which has likely
                // started the replacement already.
                Some(dead) => drop(dead),
                None => unreachable!("a permit is added only after its worker"),
            }
        }
    }

    /// [`WorkerPool::take`], or `None` once `cancel` fires.
    pub async fn take_unless(&self, cancel: &CancellationToken) -> Option<WorkerConn> {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            worker = self.take() => Some(worker),
        }
    }
}

impl Default for WorkerPool {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let idle = {
            let mut idle = self.shared.lock();
            idle.closed = true;
            std::mem::take(&mut idle.workers)
        };
        drop(idle); // retires them, outside the lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_counts_ready_workers_not_running_a_batch() {
        let stats = Arc::new(WorkerStats::default());
        stats.worker_up();
        stats.worker_up();
        assert_eq!((stats.ready(), stats.free()), (2, 2));
        let running = stats.batch_running();
        assert_eq!(stats.free(), 1);
        stats.worker_down();
        let second = stats.batch_running();
        assert_eq!(stats.free(), 0, "never below zero");
        drop((running, second));
        assert_eq!((stats.ready(), stats.free()), (1, 1));
    }

    fn worker(alive: bool) -> (WorkerConn, UnixStream, CancellationToken) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let retire = CancellationToken::new();
        let conn = WorkerConn::new(
            "w".into(),
            Connection::new(ours, 1024),
            Arc::new(AtomicBool::new(alive)),
            retire.clone(),
        );
        (conn, theirs, retire)
    }

    #[tokio::test]
    async fn a_batch_to_a_worker_gone_before_reading_was_not_delivered() {
        let (mut conn, theirs, _retire) = worker(true);
        drop(theirs); // the process died while idle
        let err = conn.run(vec![Bytes::from_static(b"1")]).await.unwrap_err();
        assert_eq!(err.kind(), FailureKind::NotDelivered, "{err}");
        let (mut conn, _theirs, _retire) = worker(false);
        let err = conn.run(vec![Bytes::from_static(b"1")]).await.unwrap_err();
        assert_eq!(err.kind(), FailureKind::NotDelivered, "{err}");
    }

    /// The batch frame a worker gets for one item with ids and an edge, as it read it.
    async fn batch_seen(reads_ids: bool, reads_edges: bool) -> Frame {
        let (conn, theirs, _retire) = worker(true);
        let mut conn = conn.with_ids(reads_ids).with_edges(reads_edges);
        let peer = tokio::spawn(async move {
            let mut peer = Connection::new(theirs, 1024);
            let batch = peer.read_frame().await.unwrap().unwrap();
            let results = Frame::Results {
                id: 1,
                items: vec![ItemResult {
                    status: natserve_protocol::ItemStatus::Ok,
                    body: Bytes::new(),
                }],
            };
            peer.write_frame(&results).await.unwrap();
            batch
        });
        let ids = vec![ItemIds {
            request_id: Bytes::from_static(b"r-1"),
            trace_id: Bytes::from_static(b"4bf92f3577b34da6a3ce929d0e0e4736"),
        }];
        let (events, _) = mpsc::channel(1);
        let (_cancel, cancels) = mpsc::unbounded_channel();
        let mut channels = BatchChannels { events, cancels };
        conn.run_with(
            vec![Bytes::from_static(b"1")],
            ids,
            vec![natserve_protocol::frame::EDGE_LAST],
            &mut channels,
        )
        .await
        .unwrap();
        peer.await.unwrap()
    }

    #[tokio::test]
    async fn ids_go_only_to_a_worker_that_said_it_reads_them() {
        let Frame::Batch { ids, edges, .. } = batch_seen(true, false).await else {
            panic!("not a batch");
        };
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].request_id.as_ref(), b"r-1");
        assert!(
            edges.is_empty(),
            "kind 6: no edges to a worker that did not ask"
        );
        // A worker written against the frames before ids gets BATCH kind 2.
        let Frame::Batch {
            ids, items, edges, ..
        } = batch_seen(false, false).await
        else {
            panic!("not a batch");
        };
        assert!(ids.is_empty() && edges.is_empty());
        assert_eq!(items.len(), 1);
        // A worker that reads edges gets each item's (BATCH kind 7).
        let Frame::Batch { ids, edges, .. } = batch_seen(true, true).await else {
            panic!("not a batch");
        };
        assert_eq!(ids.len(), 1);
        assert_eq!(edges, [natserve_protocol::frame::EDGE_LAST]);
    }

    #[tokio::test]
    async fn a_worker_that_took_the_batch_and_died_lost_it() {
        let (mut conn, theirs, _retire) = worker(true);
        let reader = tokio::spawn(async move {
            let mut peer = Connection::new(theirs, 1024);
            let batch = peer.read_frame().await.unwrap();
            assert!(matches!(batch, Some(Frame::Batch { .. })));
        });
        let err = conn.run(vec![Bytes::from_static(b"1")]).await.unwrap_err();
        reader.await.unwrap();
        assert_eq!(err.kind(), FailureKind::LostMidBatch, "{err}");
    }

    #[tokio::test]
    async fn takers_skip_dead_workers_and_a_dropped_pool_retires_the_idle() {
        let pool = WorkerPool::new();
        let sender = pool.sender();
        let (dead, _a, dead_retired) = worker(false);
        let (live, _b, live_retired) = worker(true);
        sender.put(dead);
        sender.put(live);
        let taken = pool.take().await;
        assert!(taken.is_alive());
        assert!(
            dead_retired.is_cancelled(),
            "a dead worker is dropped, not handed out"
        );
        sender.put(taken);
        drop(pool);
        assert!(
            live_retired.is_cancelled(),
            "idle workers retire with the pool"
        );
        let (late, _d, late_retired) = worker(true);
        sender.put(late);
        assert!(
            late_retired.is_cancelled(),
            "a worker returned after shutdown retires"
        );
    }

    #[tokio::test]
    async fn take_unless_gives_up_on_cancel() {
        let pool = WorkerPool::new();
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(pool.take_unless(&cancel).await.is_none());
    }

    #[test]
    fn failure_kinds_tell_delivery_apart() {
        assert_eq!(WorkerError::Exited.kind(), FailureKind::NotDelivered);
        let io = || ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(WorkerError::Send(io()).kind(), FailureKind::NotDelivered);
        assert_eq!(WorkerError::Receive(io()).kind(), FailureKind::LostMidBatch);
        assert_eq!(WorkerError::Closed.kind(), FailureKind::LostMidBatch);
    }
}
