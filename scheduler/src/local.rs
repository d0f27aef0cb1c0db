//! Hand-offs within one agent: a result for the next stage of its route goes straight to
//! that stage's letters ready to run ([`Envelopes::offer`]) when this agent hosts the
//! stage and its workers have room, instead of through the stage's stream. That saves
//! the publish, JetStream's ack of it, the delivery and the next stage's ack: on one
//! machine, most of a pipeline's broker messages and process wake-ups.
//!
//! Nothing is acked early for it. The letter carries its input's ack subject, so the
//! input stays unacknowledged (kept alive by `Progress` acks while the letter waits and
//! runs) until the next stage settles the letter, once its own result is safe. Should
//! the agent die meanwhile, JetStream delivers the input again after the ack wait and
//! the request runs again from the stage before; the requester takes the first reply and
//! a recorded result is written once, as for any redelivery. A letter given back (`Nak`:
//! its worker died) gives its input back, which then runs again from the stage before,
//! alone, and so alone at the next stage too (its delivery count says it was delivered
//! before). The stages of one agent share their open envelopes ([`OpenEnvelopes`]), so
//! an input that was a letter of an envelope is acked with the last of its batch-mates.
//!
//! The next stage takes every such letter, and the stage before pulls only while few
//! wait there ([`LocalStages::wait_for_room`]: a batch for each free worker of the next
//! stage and for each round its look-ahead keeps, at least one): a stage pulls for what
//! its agent's pipeline can run soon, and what it leaves waits in its stream, where any
//! agent's pull takes it. So agents that host the same stages share them at the first
//! stage they have in common, and a letter handed on here never goes back to a stream.
//! A stage that takes letters from the stage before keeps a pull request open at the
//! server meanwhile ([`crate::inbox`]), so what its stream holds (another agent's
//! hand-offs) runs in turn with them.
//!
//! What does not fit goes through the stream as before: a next stage this agent does
//! not host or that stopped pulling, a result over one NATS message (it goes as a claim
//! check), and an input that came as one (its object is deleted when the input is
//! settled).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::envelopes::OpenEnvelopes;
use crate::pool::WorkerStats;
use crate::stage::StageContext;

/// How often a stage waiting for room at the next one looks again without being told.
const LOOK_AGAIN: Duration = Duration::from_millis(50);

/// The stages one agent hosts, by the work subjects they serve.
#[derive(Debug, Default)]
pub struct LocalStages {
    /// Whether results may skip the stream at all (`--local-handoffs`).
    enabled: bool,
    open: Arc<OpenEnvelopes>,
    stages: RwLock<HashMap<String, Hosted>>,
}

#[derive(Debug)]
struct Hosted {
    ctx: Weak<StageContext>,
    workers: Arc<WorkerStats>,
}

impl LocalStages {
    /// An agent's stages; with `enabled` false every hand-off goes through the stream.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// The envelopes of work the agent's stages have open, shared by all of them.
    pub fn open_envelopes(&self) -> Arc<OpenEnvelopes> {
        self.open.clone()
    }

    /// Makes stage `ctx`, whose workers `workers` counts, take the letters handed to
    /// any of its places by the agent's other stages.
    pub fn host(&self, ctx: &Arc<StageContext>, workers: Arc<WorkerStats>) {
        let mut stages = self.stages.write().unwrap_or_else(|p| p.into_inner());
        for subject in ctx.outbox.places().subjects() {
            let hosted = Hosted {
                ctx: Arc::downgrade(ctx),
                workers: workers.clone(),
            };
            stages.insert(subject.to_owned(), hosted);
        }
    }

    /// Whether a stage of this agent takes hand-offs to `subject` now.
    pub fn hosts(&self, subject: &str) -> bool {
        self.enabled && self.hosted(subject).is_some()
    }

    /// The stage of this agent serving `subject`, while it has a worker ready: one whose
    /// workers cannot start leaves its work to the stream, and other agents.
    fn hosted(&self, subject: &str) -> Option<(Arc<StageContext>, Arc<WorkerStats>)> {
        let stages = self.stages.read().unwrap_or_else(|p| p.into_inner());
        let hosted = stages.get(subject)?;
        if hosted.workers.ready() == 0 {
            return None;
        }
        Some((hosted.ctx.upgrade()?, hosted.workers.clone()))
    }

    /// How many more letters the stage of this agent serving `subject` starts soon: a
    /// batch for each of its free workers and for each round its look-ahead keeps
    /// ([`crate::Lookahead::rounds_kept`]), at least one, less what waits there already.
    /// `None` where no stage here takes them (none serves `subject`, none of its workers
    /// is ready, or it stopped pulling).
    pub fn room(&self, subject: &str) -> Option<usize> {
        if !self.enabled {
            return None;
        }
        let (ctx, workers) = self.hosted(subject)?;
        if ctx.envelopes.is_closed() {
            return None;
        }
        let rounds = ctx.lookahead.rounds_kept().max(1) * workers.ready() as usize;
        let soon = (workers.free() as usize + rounds) * ctx.spec.max_batch_size.get() as usize;
        Some(soon.saturating_sub(ctx.envelopes.waiting_count()))
    }

    /// Waits while the stage of this agent serving `subject` has no [`LocalStages::room`];
    /// at once where none here takes its work, or once `cancel` fired.
    pub async fn wait_for_room(&self, subject: &str, cancel: &CancellationToken) {
        loop {
            let Some((ctx, _)) = self.hosted(subject) else {
                return;
            };
            let taken = ctx.envelopes.taken();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if self.room(subject) != Some(0) {
                return;
            }
            // Its workers coming and going changes the room without taking letters.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut taken => {}
                _ = tokio::time::sleep(LOOK_AGAIN) => {}
            }
        }
    }

    /// Leaves `letters` to run at the stage serving `subject`; what it did not take
    /// (handing on here is off, no stage here serves it, or it stopped pulling) comes
    /// back.
    pub fn offer(
        &self,
        subject: &str,
        letters: Vec<jetstream::Message>,
    ) -> Vec<jetstream::Message> {
        match self.hosted(subject) {
            Some((ctx, _)) if self.enabled => ctx.envelopes.offer(letters),
            _ => letters,
        }
    }
}

/// Whether `msg`, waiting at stage `ctx`, was handed on here by the stage before.
pub fn handed_on_here(ctx: &StageContext, msg: &jetstream::Message) -> bool {
    from_another_stream(msg, &ctx.stream)
}

/// Whether `msg`'s ack subject is that of a stream other than `stream`: a letter the
/// stage before on this agent handed on to the stage whose stream that is.
pub fn from_another_stream(msg: &jetstream::Message, stream: &str) -> bool {
    msg.info().is_ok_and(|i| i.stream != stream)
}
