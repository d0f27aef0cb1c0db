//! Dynamic batching: wait for a first item, then top up until the batch is full or
//! `max_wait` has passed since that first item.
//!
//! The source is abstract so the timing rules are tested with tokio's paused clock; the
//! JetStream source in [`crate::inbox`] maps `pull` onto pull requests, which the server
//! holds open for `wait` and completes early once `max` messages were delivered (a zero
//! `wait` is a `no_wait` request, answered at once).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

pub trait Source {
    type Item;
    type Error;

    /// Returns up to `max` items, waiting at most `wait` for them to arrive; a zero `wait`
    /// returns what is available now. An empty result means nothing arrived in time.
    fn pull(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Self::Item>, Self::Error>> + Send;

    /// Tells the source that `held` are still being batched, so it does not give them to
    /// someone else (JetStream: a `Progress` ack each). Called during long top-ups only.
    fn keep_alive(&mut self, held: &[Self::Item]) -> impl Future<Output = ()> + Send {
        let _ = held;
        async {}
    }
}

/// Batching limits of one stage.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// How long one wait for a first item lasts before the caller gets control back (to
    /// notice shutdown); an idle stage pays one pull request per `idle_poll`.
    pub idle_poll: Duration,
    /// Items held while a batch tops up are kept alive this often ([`Source::keep_alive`]),
    /// so a `max_wait` longer than the ack wait does not hand them to another agent.
    pub keep_alive: Duration,
}

/// Collects one batch. `Ok(None)` when no first item arrived within `idle_poll`.
///
/// A backlog fills the batch in one pull: the first pull takes what is queued now, up to
/// a whole batch, without waiting (batches of one skip it). Only when nothing is queued does the stage wait (up to
/// `idle_poll`) for a first item. Either way the top-up timer starts when the first item
/// is in hand.
pub async fn collect_batch<S: Source>(
    source: &mut S,
    limits: Limits,
) -> Result<Option<Vec<S::Item>>, S::Error> {
    // With batches of one, waiting for the first item is the same pull; asking first
    // would only add a round trip whenever the queue is empty.
    let mut batch = if limits.max_batch > 1 {
        source.pull(limits.max_batch, Duration::ZERO).await?
    } else {
        Vec::new()
    };
    // Whether the queue is known to hold no more than what we just took.
    let mut drained = batch.len() < limits.max_batch;
    if batch.is_empty() {
        batch = source.pull(1, limits.idle_poll).await?;
        drained = false;
        if batch.is_empty() {
            return Ok(None);
        }
    }
    let first_at = Instant::now();
    let mut kept_at = first_at;
    while batch.len() < limits.max_batch {
        let remaining = limits.max_wait.saturating_sub(first_at.elapsed());
        if remaining.is_zero() && drained {
            break;
        }
        if kept_at.elapsed() >= limits.keep_alive {
            source.keep_alive(&batch).await;
            kept_at = Instant::now();
        }
        // A top-up longer than `keep_alive` waits in pieces, keeping the batch alive
        // between them.
        let wait = remaining.min(limits.keep_alive);
        let more = source.pull(limits.max_batch - batch.len(), wait).await?;
        let got = more.len();
        batch.extend(more);
        if remaining.is_zero() || (got == 0 && wait == remaining) {
            break;
        }
    }
    Ok(Some(batch))
}

/// Splits items into those still within their deadline and those past it.
pub fn split_expired<T>(
    items: Vec<T>,
    now_ms: u64,
    deadline_ms: impl Fn(&T) -> Option<u64>,
) -> (Vec<T>, Vec<T>) {
    items
        .into_iter()
        .partition(|item| deadline_ms(item).is_none_or(|d| d > now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Items become available when the test sends them; `pull` waits like a pull request.
    struct ChannelSource(mpsc::UnboundedReceiver<u32>);

    impl Source for ChannelSource {
        type Item = u32;
        type Error = ();

        async fn pull(&mut self, max: usize, wait: Duration) -> Result<Vec<u32>, ()> {
            let mut out = Vec::new();
            let until = Instant::now() + wait;
            while out.len() < max {
                match self.0.try_recv() {
                    Ok(item) => out.push(item),
                    Err(_) if wait.is_zero() => break,
                    Err(_) => match tokio::time::timeout_at(until, self.0.recv()).await {
                        Ok(Some(item)) => out.push(item),
                        _ => break,
                    },
                }
            }
            Ok(out)
        }
    }

    fn limits(max_batch: usize, max_wait_ms: u64) -> Limits {
        Limits {
            max_batch,
            max_wait: Duration::from_millis(max_wait_ms),
            idle_poll: Duration::from_secs(1),
            keep_alive: Duration::MAX,
        }
    }

    /// Sends `item` after `delay` of (paused) time.
    fn send_at(tx: &mpsc::UnboundedSender<u32>, delay_ms: u64, item: u32) {
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let _ = tx.send(item);
        });
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_timer_starts_at_the_first_item() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = ChannelSource(rx);
        // Idle for 500 ms, then a burst: a timer started at the pull would already be over.
        send_at(&tx, 500, 1);
        send_at(&tx, 505, 2);
        send_at(&tx, 509, 3);
        send_at(&tx, 520, 4); // after first + 10 ms: belongs to the next batch
        let start = Instant::now();
        let batch = collect_batch(&mut source, limits(8, 10)).await.unwrap();
        assert_eq!(batch, Some(vec![1, 2, 3]));
        assert_eq!(start.elapsed(), Duration::from_millis(510));
        let next = collect_batch(&mut source, limits(8, 10)).await.unwrap();
        assert_eq!(next, Some(vec![4]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_does_not_wait() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = ChannelSource(rx);
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        let start = Instant::now();
        let batch = collect_batch(&mut source, limits(4, 1000)).await.unwrap();
        assert_eq!(batch, Some(vec![0, 1, 2, 3]));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_wait_takes_only_what_is_there() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = ChannelSource(rx);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        send_at(&tx, 1, 3);
        let batch = collect_batch(&mut source, limits(8, 0)).await.unwrap();
        assert_eq!(batch, Some(vec![1, 2]));
    }

    #[tokio::test(start_paused = true)]
    async fn batch_of_one_never_tops_up() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = ChannelSource(rx);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let batch = collect_batch(&mut source, limits(1, 50)).await.unwrap();
        assert_eq!(batch, Some(vec![1]));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stage_returns_after_the_idle_poll() {
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut source = ChannelSource(rx);
        let start = Instant::now();
        assert_eq!(
            collect_batch(&mut source, limits(8, 10)).await.unwrap(),
            None
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_fills_the_batch_in_one_pull() {
        struct Counting(ChannelSource, usize);
        impl Source for Counting {
            type Item = u32;
            type Error = ();
            async fn pull(&mut self, max: usize, wait: Duration) -> Result<Vec<u32>, ()> {
                self.1 += 1;
                self.0.pull(max, wait).await
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = Counting(ChannelSource(rx), 0);
        for i in 0..20 {
            tx.send(i).unwrap();
        }
        let batch = collect_batch(&mut source, limits(16, 10)).await.unwrap();
        assert_eq!(batch.map(|b| b.len()), Some(16));
        assert_eq!(source.1, 1, "one pull for a full batch");
        // Four left: taken at once, then one top-up that waits out max_wait.
        let start = Instant::now();
        let batch = collect_batch(&mut source, limits(16, 10)).await.unwrap();
        assert_eq!(batch, Some(vec![16, 17, 18, 19]));
        assert_eq!(source.1, 3);
        assert_eq!(start.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn without_max_wait_a_partial_backlog_goes_at_once() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = ChannelSource(rx);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let start = Instant::now();
        let batch = collect_batch(&mut source, limits(8, 0)).await.unwrap();
        assert_eq!(batch, Some(vec![1, 2]));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_top_up_keeps_the_held_items_alive() {
        struct Kept(ChannelSource, Vec<(Duration, usize)>, Instant);
        impl Source for Kept {
            type Item = u32;
            type Error = ();
            async fn pull(&mut self, max: usize, wait: Duration) -> Result<Vec<u32>, ()> {
                self.0.pull(max, wait).await
            }
            async fn keep_alive(&mut self, held: &[u32]) {
                self.1.push((self.2.elapsed(), held.len()));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let mut source = Kept(ChannelSource(rx), Vec::new(), start);
        tx.send(1).unwrap();
        send_at(&tx, 150, 2);
        let mut l = limits(8, 350);
        l.keep_alive = Duration::from_millis(100);
        let batch = collect_batch(&mut source, l).await.unwrap();
        assert_eq!(batch, Some(vec![1, 2]));
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(350),
            "max_wait is kept"
        );
        let at: Vec<_> = source.1.iter().map(|(t, n)| (t.as_millis(), *n)).collect();
        assert_eq!(at, vec![(100, 1), (200, 2), (300, 2)]);
    }

    #[test]
    fn expired_items_are_split_off() {
        let items = vec![(1, Some(100)), (2, Some(300)), (3, None), (4, Some(200))];
        let (live, expired) = split_expired(items, 200, |(_, d)| *d);
        assert_eq!(live, vec![(2, Some(300)), (3, None)]);
        assert_eq!(expired, vec![(1, Some(100)), (4, Some(200))]);
    }
}
