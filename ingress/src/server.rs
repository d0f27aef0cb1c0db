//! The life of one ingress: connect, load the route table, serve HTTP, and shut down in a
//! fixed order (refuse new work, let in-flight requests finish, stop HTTP, drain NATS).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use natserve_protocol::Names;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::drain::Drain;
use crate::error::Error;
use crate::http::{router, App};
use crate::listen;
use crate::metrics::Metrics;
use crate::replies::{self, Replies};
use crate::routes::RouteTable;
use crate::submit::{Submitter, REPLY_GRACE};
use crate::watch::{Followed, Watchers};
use async_nats::jetstream::kv;
use natserve_protocol::buckets::{
    agents_bucket_config, open_bucket, routes_bucket_config, BucketError,
};
use natserve_protocol::nats::settled;
use natserve_protocol::payloads::Payloads;

/// How long the NATS client gets to flush and close at the end.
const NATS_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long start-up waits for the existing routes and agents before serving anyway.
const INITIAL_LOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a ready-first ingress asks itself whether it is ready, until it is.
const READY_POLL: Duration = Duration::from_millis(25);
/// The accept backlog of a socket the ingress starts listening on itself.
const BACKLOG: u32 = 1024;

/// Where the ingress serves HTTP: a listener already accepting, or a socket bound (its
/// port is taken, so a clash fails at start-up) that starts listening only once `GET /`
/// would answer 200. Until then a client's connect is refused, as with a service that
/// has not started yet.
#[derive(Debug)]
pub enum Listener {
    Now(TcpListener),
    WhenReady(TcpSocket),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Listener::Now(listener)
    }
}

/// A short random id naming this ingress in its reply subjects.
pub fn ingress_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(12);
    id
}

/// Serves HTTP on `listener` until `shutdown` completes, then drains and returns.
///
/// Fails only when it cannot start (bad namespace, NATS unreachable for
/// `config.connect_timeout`, buckets that cannot be opened) or when the HTTP server fails.
pub async fn run(
    listener: impl Into<Listener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let listener = listener.into();
    let names = Names::new(&config.namespace)?;
    let id = ingress_id();
    let identity = natserve_protocol::nats::Identity {
        name: format!("natserve-ingress-{id}"),
        inbox_prefix: names.inbox_prefix("ingress"),
    };
    let client = natserve_protocol::nats::connect(
        &config.nats_url,
        &config.nats_security,
        &identity,
        config.connect_timeout,
    )
    .await?;
    natserve_protocol::replicas::check_cluster(&client, config.replicas)?;

    let replies = Replies::new(names.reply_prefix(&id));
    let subject = replies.wildcard();
    let subscription = client
        .subscribe(subject.clone())
        .await
        .map_err(|source| Error::Subscribe { subject, source })?;
    let payloads = Payloads::new(async_nats::jetstream::new(client.clone()), &names)
        .with_replicas(config.replicas);
    let dispatcher = tokio::spawn(replies::dispatch(
        subscription,
        replies.clone(),
        payloads.clone(),
    ));

    let submitter = Submitter::new(client.clone(), names.clone(), replies, payloads);
    let js = submitter.jetstream().clone();
    let replicas = config.replicas;
    // Every bucket error at start is one a JetStream cluster still settling may give (a
    // peer not yet known, a bucket just made without a leader yet): retried a while.
    let open = |config: kv::Config| {
        let js = &js;
        settled(
            "kv bucket",
            |_: &BucketError| true,
            move || open_bucket(js, config.clone()),
        )
    };
    let routes = Followed {
        store: open(routes_bucket_config(&names, replicas)).await?,
        config: routes_bucket_config(&names, replicas),
    };
    let agents = Followed {
        store: open(agents_bucket_config(&names, replicas)).await?,
        config: agents_bucket_config(&names, replicas),
    };
    let results = settled(
        "results bucket",
        |_: &BucketError| true,
        || natserve_protocol::Results::open(&js, &names, replicas),
    )
    .await?;
    let table = RouteTable::shared();
    let watching = CancellationToken::new();
    let mut watchers = Watchers::spawn(js, routes, agents, table.clone(), watching.clone());
    if !watchers.loaded(INITIAL_LOAD_TIMEOUT).await {
        warn!("routes and agents not fully loaded yet; serving what is known");
    }

    let metrics = Metrics::new()?;
    let app = Arc::new(App {
        drain: Drain::new(metrics.inflight()),
        config: config.clone(),
        names: names.clone(),
        routes: table,
        submitter,
        results: Some(results),
        metrics,
    });

    tokio::pin!(shutdown);
    let listener = match listener {
        Listener::Now(listener) => listener,
        Listener::WhenReady(socket) => {
            let address = socket.local_addr()?;
            info!(%address, "waiting for every stage to have a ready worker before listening");
            let ready = async {
                while app.ready().await.is_err() {
                    tokio::time::sleep(READY_POLL).await;
                }
            };
            tokio::select! {
                () = ready => socket.listen(BACKLOG)?,
                () = &mut shutdown => {
                    watching.cancel();
                    watchers.join().await;
                    let _ = client.drain().await;
                    info!("ingress stopped before it was ready");
                    return Ok(());
                }
            }
        }
    };
    let address = listener.local_addr()?;
    let stop_http = CancellationToken::new();
    let limits = listen::Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
    };
    let mut server = tokio::spawn(listen::serve(
        listener,
        router(app.clone()),
        limits,
        stop_http.clone().cancelled_owned(),
    ));
    info!(ingress = %id, %address, namespace = names.namespace(), "ingress listening");

    let early_exit = tokio::select! {
        () = &mut shutdown => None,
        exited = &mut server => Some(exited),
    };
    if let Some(exited) = early_exit {
        watching.cancel();
        let _ = client.drain().await;
        return match exited {
            Ok(result) => result.map_err(Error::Serve),
            Err(join) => Err(Error::Serve(std::io::Error::other(join))),
        };
    }

    info!(
        inflight = app.drain.inflight(),
        grace_ms = config.grace.as_millis() as u64,
        "draining"
    );
    app.drain.start_draining();
    if !app.drain.wait_idle(config.grace).await {
        warn!(
            inflight = app.drain.inflight(),
            "grace period over with requests in flight"
        );
    }
    stop_http.cancel();
    // Every request ends by its deadline, so open connections close by then; past that,
    // whatever is left is cut.
    let backstop = config.timeout + REPLY_GRACE + Duration::from_secs(1);
    match tokio::time::timeout(backstop, &mut server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => warn!(error = %join, "http server task failed"),
        Err(_) => {
            warn!("http connections still open after the backstop, closing them");
            server.abort();
        }
    }

    watching.cancel();
    watchers.join().await;
    let close = async {
        let _ = client.flush().await;
        let _ = client.drain().await;
        let _ = dispatcher.await;
    };
    if tokio::time::timeout(NATS_CLOSE_TIMEOUT, close)
        .await
        .is_err()
    {
        warn!("nats client did not close in time");
    }
    info!("ingress stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_ids_are_short_subject_tokens() {
        let a = ingress_id();
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, ingress_id());
    }
}
