//! Prometheus metrics of one stage on one agent.

use prometheus::{
    exponential_buckets, histogram_opts, opts, Histogram, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Registry,
};

#[derive(Clone)]
pub struct StageMetrics {
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub worker_failures: IntCounter,
    pub handed_back: IntCounter,
    pub handed_on_here: IntCounter,
    items: IntCounterVec,
    results: IntCounterVec,
    route: String,
    stage: String,
}

impl StageMetrics {
    pub fn count_item(&self, outcome: natserve_protocol::Outcome) {
        self.items
            .with_label_values(&[self.route.as_str(), self.stage.as_str(), outcome.as_str()])
            .inc();
    }

    /// One asynchronous job's result record: `written`, `duplicate` (another run wrote
    /// it first), `too_large`, `failed` or `refused` (not a result id).
    pub fn count_result(&self, result: &str) {
        self.results
            .with_label_values(&[self.route.as_str(), self.stage.as_str(), result])
            .inc();
    }
}

/// Metric families shared by all stages of an agent, labelled by route and stage.
#[derive(Clone)]
pub struct AgentMetrics {
    batch_size: HistogramVec,
    batch_seconds: HistogramVec,
    queue_wait_seconds: HistogramVec,
    items: IntCounterVec,
    results: IntCounterVec,
    worker_failures: IntCounterVec,
    handed_back: IntCounterVec,
    handed_on_here: IntCounterVec,
}

impl AgentMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let batch_size = HistogramVec::new(
            histogram_opts!(
                "natserve_agent_batch_size",
                "Items per batch run on a worker",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
            ),
            &["route", "stage"],
        )?;
        let batch_seconds = HistogramVec::new(
            histogram_opts!(
                "natserve_agent_batch_duration_seconds",
                "Time a worker took to run one batch",
                exponential_buckets(0.0005, 2.0, 16)?
            ),
            &["route", "stage"],
        )?;
        let queue_wait_seconds = HistogramVec::new(
            histogram_opts!(
                "natserve_agent_queue_wait_seconds",
                "Time a request waited in the stage's queue: from its publish to the stage's \
                 stream (the NATS server's clock) to the start of the batch that runs it",
                exponential_buckets(0.0005, 2.0, 18)?
            ),
            &["route", "stage"],
        )?;
        let items = IntCounterVec::new(
            opts!("natserve_agent_items_total", "Items run, by outcome"),
            &["route", "stage", "outcome"],
        )?;
        let results = IntCounterVec::new(
            opts!(
                "natserve_agent_results_total",
                "Asynchronous jobs' result records written to the results bucket, by result"
            ),
            &["route", "stage", "result"],
        )?;
        let worker_failures = IntCounterVec::new(
            opts!(
                "natserve_agent_worker_failures_total",
                "Batches lost to a worker that crashed, hung or broke protocol"
            ),
            &["route", "stage"],
        )?;
        let handed_back = IntCounterVec::new(
            opts!(
                "natserve_agent_handed_back_total",
                "Requests pulled in an envelope and given back to the stage's stream unrun, \
                 since this agent would not start them soon"
            ),
            &["route", "stage"],
        )?;
        let handed_on_here = IntCounterVec::new(
            opts!(
                "natserve_agent_handed_on_here_total",
                "Results handed to the next stage of their route on this agent, without its \
                 stream: their inputs are acked once the next stage settles them"
            ),
            &["route", "stage"],
        )?;
        let build_info = IntGaugeVec::new(
            opts!(
                "natserve_build_info",
                "always 1; the labels say which natserve build answers"
            ),
            &["version", "component"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "agent"])
            .set(1);
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(batch_seconds.clone()))?;
        registry.register(Box::new(queue_wait_seconds.clone()))?;
        registry.register(Box::new(items.clone()))?;
        registry.register(Box::new(results.clone()))?;
        registry.register(Box::new(worker_failures.clone()))?;
        registry.register(Box::new(handed_back.clone()))?;
        registry.register(Box::new(handed_on_here.clone()))?;
        Ok(Self {
            batch_size,
            batch_seconds,
            queue_wait_seconds,
            items,
            results,
            worker_failures,
            handed_back,
            handed_on_here,
        })
    }

    pub fn stage(&self, route: &str, stage: u32) -> StageMetrics {
        let stage = stage.to_string();
        let labels = [route, stage.as_str()];
        StageMetrics {
            batch_size: self.batch_size.with_label_values(&labels),
            batch_seconds: self.batch_seconds.with_label_values(&labels),
            queue_wait_seconds: self.queue_wait_seconds.with_label_values(&labels),
            worker_failures: self.worker_failures.with_label_values(&labels),
            handed_back: self.handed_back.with_label_values(&labels),
            handed_on_here: self.handed_on_here.with_label_values(&labels),
            items: self.items.clone(),
            results: self.results.clone(),
            route: route.to_owned(),
            stage,
        }
    }
}
