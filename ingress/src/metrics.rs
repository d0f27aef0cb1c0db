//! Prometheus metrics of one ingress, in its own [`Registry`] passed around as state.
//!
//! Request counters and histograms are updated as requests finish; queue depth and ready
//! workers per stage are refreshed when `/metrics` is scraped, from the route table and
//! one consumer-info request per stage.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::http::StatusCode;
use futures::future::join_all;
use natserve_protocol::{Names, CONSUMER};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tracing::debug;

use crate::routes::SharedRoutes;

/// Route label of requests for paths no route serves, so stray paths cannot grow the
/// label set without bound.
pub const UNKNOWN_ROUTE: &str = "unknown";
/// How long a scrape waits for consumer info before it reports what it has.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every metric the ingress exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    batch_size: HistogramVec,
    queue_depth: IntGaugeVec,
    stage_workers: IntGaugeVec,
    inflight: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "natserve_requests_total",
                "requests answered, by route and http status",
            ),
            &["route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "natserve_request_duration_seconds",
                "time from request arrival to answer",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )?;
        let batch_size = HistogramVec::new(
            HistogramOpts::new(
                "natserve_stage_batch_size",
                "size of the batch each request ran in, per stage",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
            &["route", "stage"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "natserve_queue_depth",
                "messages waiting or being worked on in a stage's queue (num_pending + num_ack_pending)",
            ),
            &["route", "stage"],
        )?;
        let stage_workers = IntGaugeVec::new(
            Opts::new(
                "natserve_stage_workers",
                "ready workers of a stage across live agents",
            ),
            &["route", "stage"],
        )?;
        let inflight = IntGauge::new("natserve_inflight_requests", "requests waiting for a reply")?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "natserve_build_info",
                "always 1; the labels say which natserve build answers",
            ),
            &["version", "component"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "ingress"])
            .set(1);
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(stage_workers.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        Ok(Self {
            registry,
            requests,
            duration,
            batch_size,
            queue_depth,
            stage_workers,
            inflight,
        })
    }

    pub fn inflight(&self) -> IntGauge {
        self.inflight.clone()
    }

    /// Records one answered request.
    pub fn observe(
        &self,
        route: &str,
        status: StatusCode,
        elapsed: Duration,
        batch_sizes: Option<&str>,
    ) {
        self.requests
            .with_label_values(&[route, status.as_str()])
            .inc();
        self.duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        for (stage, size) in batch_sizes
            .map(parse_batch_sizes)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            self.batch_size
                .with_label_values(&[route, &stage.to_string()])
                .observe(f64::from(size));
        }
    }

    /// Refreshes the per-stage gauges: ready workers from the table, queue depth from
    /// JetStream. Stages whose stream or consumer does not exist are left out.
    pub async fn refresh(
        &self,
        table: &SharedRoutes,
        jetstream: &jetstream::Context,
        names: &Names,
    ) {
        let now = Instant::now();
        let mut stages = Vec::new();
        {
            let table = table.read().unwrap_or_else(|p| p.into_inner());
            self.stage_workers.reset();
            for (_, record) in table.routes(now) {
                for stage in 0..record.stages {
                    let ready = table.ready_workers(&record.route, stage, now);
                    self.stage_workers
                        .with_label_values(&[record.route.as_str(), &stage.to_string()])
                        .set(i64::try_from(ready).unwrap_or(i64::MAX));
                    // A shared stage's depth is its one queue's, on each of its places.
                    if let Ok(stream) = names.stream_at(&record.queue(stage)) {
                        stages.push((record.route.clone(), stream, stage));
                    }
                }
            }
        }
        let depths = stages.iter().map(|(route, stream, stage)| async move {
            let stream = jetstream.get_stream_no_info(stream).await.ok()?;
            match stream.consumer_info(CONSUMER).await {
                Ok(info) => Some((
                    route,
                    *stage,
                    info.num_pending + info.num_ack_pending as u64,
                )),
                Err(e) => {
                    debug!(route, stage, error = %e, "no queue depth for stage");
                    None
                }
            }
        });
        let depths = tokio::time::timeout(SCRAPE_TIMEOUT, join_all(depths))
            .await
            .unwrap_or_default();
        self.queue_depth.reset();
        for (route, stage, depth) in depths.into_iter().flatten() {
            self.queue_depth
                .with_label_values(&[route.as_str(), &stage.to_string()])
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own well-formed metrics into memory cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Parses `X-Batch-Sizes`: comma-separated positive integers, one per stage. A malformed
/// header yields nothing rather than half a list with shifted stage numbers.
pub fn parse_batch_sizes(header: &str) -> Vec<u32> {
    let sizes: Result<Vec<u32>, _> = header.split(',').map(|s| s.trim().parse::<u32>()).collect();
    match sizes {
        Ok(sizes) if !sizes.contains(&0) => sizes,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_batch_sizes() {
        assert_eq!(parse_batch_sizes("4"), vec![4]);
        assert_eq!(parse_batch_sizes("4,1,16"), vec![4, 1, 16]);
        assert_eq!(parse_batch_sizes(" 2 , 3 "), vec![2, 3]);
        for bad in ["", ",", "1,", "a", "1,x", "-1", "0", "1,0"] {
            assert!(parse_batch_sizes(bad).is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn renders_what_it_observed() {
        let m = Metrics::new().unwrap();
        m.observe(
            "/inference",
            StatusCode::OK,
            Duration::from_millis(3),
            Some("4,1"),
        );
        m.observe(
            "/inference",
            StatusCode::UNPROCESSABLE_ENTITY,
            Duration::from_millis(1),
            None,
        );
        m.inflight().inc();
        let text = m.render();
        assert!(
            text.contains(r#"natserve_requests_total{route="/inference",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"natserve_requests_total{route="/inference",status="422"} 1"#));
        assert!(text.contains(r#"natserve_request_duration_seconds_count{route="/inference"} 2"#));
        assert!(text.contains(r#"natserve_stage_batch_size_sum{route="/inference",stage="0"} 4"#));
        assert!(text.contains(r#"natserve_stage_batch_size_sum{route="/inference",stage="1"} 1"#));
        assert!(text.contains(
            "# HELP natserve_stage_batch_size size of the batch each request ran in, per stage"
        ));
        assert!(text.contains("natserve_inflight_requests 1"));
    }
}
