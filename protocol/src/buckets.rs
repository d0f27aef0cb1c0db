//! The KV buckets agents write and ingresses watch (routes, agents) and the results
//! bucket of asynchronous jobs. Their settings live here alone, so whichever process
//! comes first creates them the same way; each is kept on `replicas` servers of a
//! JetStream cluster ([`crate::replicas`]).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tracing::info;

use crate::{replicas, Names};

/// How long the agents bucket keeps a record an agent stopped refreshing. Readers already
/// ignore an agent after three missed heartbeats; this only bounds the garbage.
pub const AGENTS_MAX_AGE: Duration = Duration::from_secs(30);

/// How often a live agent rewrites its route records, whatever its heartbeat.
pub const ROUTE_REFRESH: Duration = Duration::from_secs(30);
/// A route record no agent refreshed for this long, with no live agent serving the route,
/// is abandoned (a renamed or retired route): ingresses stop serving and counting it.
pub const ROUTE_ABANDONED_AFTER: Duration = Duration::from_secs(3 * ROUTE_REFRESH.as_secs());

/// The routes bucket: one value per key, rewritten by live agents every [`ROUTE_REFRESH`].
pub fn routes_bucket_config(names: &Names, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: names.routes_bucket(),
        description: "natserve routes, by slug".to_owned(),
        history: 1,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The agents bucket: one heartbeat per agent, dropped by the server after a while.
pub fn agents_bucket_config(names: &Names, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: names.agents_bucket(),
        description: "natserve live agents, by id".to_owned(),
        history: 1,
        max_age: AGENTS_MAX_AGE,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// How long a finished asynchronous job's result is kept when its submitter named no
/// TTL (`X-Result-Ttl`); the ingress's `--result-ttl-s` default.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(3600);
/// The longest a result is kept, whatever its TTL says: the bucket's `max_age`, so a
/// record written without a TTL cannot stay forever either.
pub const MAX_RESULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the marker the server leaves where a record expired stays (it must be set
/// for per-record TTLs to be allowed at all; nothing reads it).
const RESULT_MARKER_TTL: Duration = Duration::from_secs(5);

/// The results bucket: one record per asynchronous job (and per durable reply), each with
/// its own TTL (`Nats-TTL`, nats-server >= 2.11), set by whoever writes it; one revision
/// per key. It names no replicas: opened with it, a bucket keeps the copies it has (one
/// when made with it). [`crate::Results::open`] uses [`replicated_results_bucket_config`].
pub fn results_bucket_config(names: &Names) -> kv::Config {
    kv::Config {
        bucket: names.results_bucket(),
        description: "natserve results of asynchronous jobs, by result id".to_owned(),
        history: 1,
        max_age: MAX_RESULT_TTL,
        limit_markers: Some(RESULT_MARKER_TTL),
        ..Default::default()
    }
}

/// [`results_bucket_config`] on `replicas` servers.
pub fn replicated_results_bucket_config(names: &Names, replicas: usize) -> kv::Config {
    kv::Config {
        num_replicas: replicas,
        ..results_bucket_config(names)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("could not open kv bucket {bucket}: {message}")]
pub struct BucketError {
    pub bucket: String,
    pub message: String,
}

/// Opens a bucket, creating it when missing. A creation that loses a race with another
/// process (or finds the bucket made with other settings) falls back to opening it. A
/// bucket found with fewer replicas than `config` names is raised to them where the
/// server allows it ([`replicas::raise`]).
pub async fn open_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, BucketError> {
    let bucket = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&bucket).await {
        replicas::raise(js, store.stream.cached_info(), config.num_replicas).await;
        return Ok(store);
    }
    match js.create_key_value(config).await {
        Ok(store) => {
            info!(bucket, "created kv bucket");
            Ok(store)
        }
        Err(create) => js.get_key_value(&bucket).await.map_err(|get| BucketError {
            bucket,
            message: format!("create failed ({create}), then get failed ({get})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_configs_follow_the_names() {
        let names = Names::new("prod").unwrap();
        let routes = routes_bucket_config(&names, 3);
        assert_eq!((routes.bucket.as_str(), routes.history), ("prod_routes", 1));
        assert_eq!((routes.max_age, routes.num_replicas), (Duration::ZERO, 3));
        let agents = agents_bucket_config(&names, 1);
        assert_eq!((agents.bucket.as_str(), agents.history), ("prod_agents", 1));
        assert_eq!((agents.max_age, agents.num_replicas), (AGENTS_MAX_AGE, 1));
        let results = results_bucket_config(&names);
        assert_eq!(
            (results.bucket.as_str(), results.history),
            ("prod_results", 1)
        );
        assert_eq!(results.max_age, MAX_RESULT_TTL);
        assert!(
            results.limit_markers.is_some(),
            "per-record TTLs need markers on"
        );
        assert_eq!(results.num_replicas, 0, "keeps what the bucket has");
        let replicated = replicated_results_bucket_config(&names, 5);
        assert_eq!(replicated.num_replicas, 5);
        assert_eq!(replicated.bucket, results.bucket);
    }
}
