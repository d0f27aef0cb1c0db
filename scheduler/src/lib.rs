//! The per-stage scheduler: pulls a stage's work from JetStream sized to free worker
//! slots, forms batches dynamically, runs them on idle local workers, hands each result
//! on (next stage or the requester's reply subject), and only then acks.
//!
//! The agent owns processes; this crate owns what happens to messages. The two meet at
//! [`WorkerPool`]: the agent puts ready worker connections in, the scheduler takes an idle
//! one out for each batch and puts it back when the batch is done.

#![forbid(unsafe_code)]

pub mod batcher;
pub mod cancel;
pub mod envelopes;
mod handback;
pub mod ids;
pub mod inbox;
pub mod local;
pub mod lookahead;
pub mod metrics;
pub mod outbox;
pub mod places;
pub mod pool;
mod pull;
pub mod run;
pub mod stage;

pub use cancel::Cancellations;
pub use local::LocalStages;
pub use lookahead::{Lookahead, Prefetch};
pub use metrics::{AgentMetrics, StageMetrics};
pub use pool::{
    BatchChannels, FailureKind, PoolSender, StreamEvent, WorkerConn, WorkerError, WorkerPool,
    WorkerStats,
};
pub use stage::{ensure_stage, run_stage, StageError};
