//! The agent's presence in NATS: its routes in `<ns>_routes`, itself in `<ns>_agents`
//! refreshed every heartbeat, and its record deleted when it stops cleanly.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use natserve_protocol::buckets::{
    agents_bucket_config, open_bucket, routes_bucket_config, BucketError,
};
use natserve_protocol::{AgentRecord, Names, RouteRecord, StageLoad};
use natserve_scheduler::{StageSpec, WorkerStats};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::RouteSpec;

/// Routes are rewritten every this many heartbeats, healing a NATS server that lost them.
const ROUTES_EVERY: u32 = 15;

pub struct Registration {
    agents: kv::Store,
    routes: kv::Store,
    key: String,
    host: String,
    heartbeat: Duration,
    route_records: Vec<(String, RouteRecord)>,
    stages: Vec<(StageSpec, Arc<WorkerStats>)>,
}

impl Registration {
    pub async fn open(
        js: &jetstream::Context,
        names: &Names,
        heartbeat: Duration,
        routes: &[RouteSpec],
        stages: Vec<(StageSpec, Arc<WorkerStats>)>,
    ) -> Result<Self, BucketError> {
        let agents = open_bucket(js, agents_bucket_config(names)).await?;
        let routes_kv = open_bucket(js, routes_bucket_config(names)).await?;
        let host = hostname();
        let key = format!(
            "{}-{}-{}",
            sanitize(&host),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let route_records = routes
            .iter()
            .filter(|r| stages.iter().any(|(s, _)| s.route == r.route))
            .map(|r| {
                let slug = natserve_protocol::route_slug(&r.route).unwrap_or_default();
                let record = RouteRecord {
                    route: r.route.clone(),
                    stages: r.names.len() as u32,
                    names: r.names.clone(),
                };
                (slug, record)
            })
            .collect();
        Ok(Self {
            agents,
            routes: routes_kv,
            key,
            host,
            heartbeat,
            route_records,
            stages,
        })
    }

    pub fn id(&self) -> &str {
        &self.key
    }

    pub fn record(&self) -> AgentRecord {
        AgentRecord {
            id: self.key.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            stages: self
                .stages
                .iter()
                .map(|(spec, stats)| StageLoad {
                    route: spec.route.clone(),
                    stage: spec.stage,
                    name: spec.name.clone(),
                    workers: spec.num,
                    ready: stats.ready(),
                    free: stats.free(),
                })
                .collect(),
        }
    }

    /// Every hosted stage has at least one ready worker.
    pub fn is_ready(&self) -> bool {
        self.stages.iter().all(|(_, stats)| stats.ready() > 0)
    }

    async fn put_routes(&self) {
        for (slug, record) in &self.route_records {
            let value = serde_json::to_vec(record).expect("route record serializes");
            if let Err(e) = self.routes.put(slug, value.into()).await {
                warn!(route = %record.route, error = %e, "route registration failed");
            }
        }
    }

    /// Publishes the record every heartbeat until `cancel` fires, then deletes it.
    pub async fn heartbeat_until(&self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.heartbeat);
        let mut beats = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if beats.is_multiple_of(ROUTES_EVERY) {
                self.put_routes().await;
            }
            beats = beats.wrapping_add(1);
            let value = serde_json::to_vec(&self.record()).expect("agent record serializes");
            if let Err(e) = self.agents.put(&self.key, value.into()).await {
                warn!(error = %e, "heartbeat failed");
            }
        }
        if let Err(e) = self.agents.delete(&self.key).await {
            warn!(error = %e, "deregistration failed; the record expires on its own");
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname NUL-terminates or
    // truncates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// KV keys allow letters, digits and `-_=./`; anything else in a hostname becomes `-`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_become_valid_keys() {
        assert_eq!(sanitize("gpu-1.example.com"), "gpu-1-example-com");
        assert_eq!(sanitize("ünï"), "-n-");
    }
}
