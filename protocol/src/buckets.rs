//! The KV buckets agents write and ingresses watch. Their settings live here alone, so
//! whichever process comes first creates them the same way.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tracing::info;

use crate::Names;

/// How long the agents bucket keeps a record an agent stopped refreshing. Readers already
/// ignore an agent after three missed heartbeats; this only bounds the garbage.
pub const AGENTS_MAX_AGE: Duration = Duration::from_secs(30);

/// How often a live agent rewrites its route records, whatever its heartbeat.
pub const ROUTE_REFRESH: Duration = Duration::from_secs(30);
/// A route record no agent refreshed for this long, with no live agent serving the route,
/// is abandoned (a renamed or retired route): ingresses stop serving and counting it.
pub const ROUTE_ABANDONED_AFTER: Duration = Duration::from_secs(3 * ROUTE_REFRESH.as_secs());

/// The routes bucket: one value per key, rewritten by live agents every [`ROUTE_REFRESH`].
pub fn routes_bucket_config(names: &Names) -> kv::Config {
    kv::Config {
        bucket: names.routes_bucket(),
        description: "natserve routes, by slug".to_owned(),
        history: 1,
        ..Default::default()
    }
}

/// The agents bucket: one heartbeat per agent, dropped by the server after a while.
pub fn agents_bucket_config(names: &Names) -> kv::Config {
    kv::Config {
        bucket: names.agents_bucket(),
        description: "natserve live agents, by id".to_owned(),
        history: 1,
        max_age: AGENTS_MAX_AGE,
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("could not open kv bucket {bucket}: {message}")]
pub struct BucketError {
    pub bucket: String,
    pub message: String,
}

/// Opens a bucket, creating it when missing. A creation that loses a race with another
/// process (or finds the bucket made with other settings) falls back to opening it.
pub async fn open_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, BucketError> {
    let bucket = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&bucket).await {
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
        let routes = routes_bucket_config(&names);
        assert_eq!((routes.bucket.as_str(), routes.history), ("prod_routes", 1));
        assert_eq!(routes.max_age, Duration::ZERO);
        let agents = agents_bucket_config(&names);
        assert_eq!((agents.bucket.as_str(), agents.history), ("prod_agents", 1));
        assert_eq!(agents.max_age, AGENTS_MAX_AGE);
    }
}
