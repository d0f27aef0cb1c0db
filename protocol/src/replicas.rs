//! How many servers of a JetStream cluster keep a copy of each stream natserve makes: the
//! work queues ([`crate::streams`]), the KV buckets ([`crate::buckets`]) and the payloads
//! object store ([`crate::payloads`]). One setting, `--replicas`, which every config
//! function takes and every process passes; JetStream does the replication.
//!
//! `--replicas` is a floor, never a ceiling: a process finding a stream with fewer copies
//! raises it (a JetStream cluster allows that on update: it adds peers and catches them
//! up), and one finding more leaves it. So a process started with the default (an older
//! ingress, a `natserve.Client` whose caller named no replicas) never shrinks what an
//! operator asked of the others; lowering is an operator's act
//! (`nats stream edit <stream> --replicas 1`).

use async_nats::jetstream::{self, stream};
use tracing::{info, warn};

/// Copies of one stream: JetStream's own limit.
pub const MAX_REPLICAS: usize = 5;

/// More than one copy asked of a server that is in no cluster.
#[derive(Debug, thiserror::Error)]
#[error(
    "--replicas {replicas}: the NATS server {server} is not in a cluster, and a lone server \
     keeps one copy of a stream: give --nats the URLs of a JetStream cluster, or --replicas 1"
)]
pub struct NotClustered {
    pub replicas: usize,
    pub server: String,
}

/// Refuses `replicas` above one when `client`'s server is in no cluster: it would refuse
/// every stream natserve makes, so a process says why at once.
pub fn check_cluster(client: &async_nats::Client, replicas: usize) -> Result<(), NotClustered> {
    let info = client.server_info();
    if replicas > 1 && info.cluster.as_deref().unwrap_or("").is_empty() {
        return Err(NotClustered {
            replicas,
            server: info.server_name,
        });
    }
    Ok(())
}

/// The replicas a stream should have: `wanted`, or more when it already has more.
pub fn at_least(wanted: usize, existing: usize) -> usize {
    wanted.max(existing).max(1)
}

/// Raises the stream behind `info` to `wanted` copies if it has fewer. A server that
/// refuses (a lone server allows one copy, a cluster no more than its size) leaves the
/// stream as it was, still serving: the refusal is logged with what to fix, and `false`
/// returned.
pub async fn raise(js: &jetstream::Context, info: &stream::Info, wanted: usize) -> bool {
    let config = &info.config;
    let has = config.num_replicas.max(1);
    if wanted <= has {
        return true;
    }
    let raised = stream::Config {
        num_replicas: wanted,
        ..config.clone()
    };
    match js.update_stream(raised).await {
        Ok(_) => {
            info!(stream = %config.name, from = has, to = wanted, "raised stream replicas");
            true
        }
        Err(e) => {
            warn!(
                stream = %config.name,
                has,
                wanted,
                error = %e,
                "cannot raise stream replicas (a lone server keeps one; a cluster no more than \
                 its servers): it keeps serving with what it has"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_a_floor() {
        assert_eq!(at_least(3, 1), 3);
        assert_eq!(at_least(1, 3), 3, "never lowered");
        assert_eq!(at_least(1, 0), 1, "0 is the server's default: one copy");
    }
}
