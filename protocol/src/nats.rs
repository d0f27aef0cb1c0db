//! How every natserve process reaches NATS: the first connect with retries, then
//! reconnect forever, logging what the client reports (a slow consumer there means
//! messages were dropped).

use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use tokio::time::Instant;
use tracing::{info, warn};

/// Messages a subscription buffers before the client drops them as a slow consumer. An
/// ingress's reply subscription carries every reply in flight, so it is generous; the
/// channel allocates as it fills, not up front.
pub const SUBSCRIPTION_CAPACITY: usize = 1 << 20;
/// Pause between first-connect attempts.
pub const RETRY_DELAY: Duration = Duration::from_millis(250);

/// Parses `--nats`: one URL or a comma-separated list.
pub fn parse_servers(urls: &str) -> Result<Vec<ServerAddr>, String> {
    let servers: Result<Vec<ServerAddr>, _> = urls
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<ServerAddr>().map_err(|e| format!("{s:?}: {e}")))
        .collect();
    match servers {
        Ok(s) if s.is_empty() => Err("no server url given".to_owned()),
        other => other,
    }
}

fn options(name: &str) -> ConnectOptions {
    ConnectOptions::new()
        .name(name)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .connection_timeout(Duration::from_secs(2))
        // Once connected, never give up: without NATS an ingress answers 503 and an agent
        // pulls nothing until it heals.
        .max_reconnects(None)
        .event_callback(|event| async move { log_event(event) })
}

fn log_event(event: Event) {
    match event {
        Event::Connected => info!("nats connected"),
        Event::Disconnected => warn!("nats disconnected, reconnecting"),
        Event::SlowConsumer(sid) => {
            warn!(
                sid,
                "nats slow consumer: messages were dropped, replies may be lost"
            )
        }
        Event::LameDuckMode => warn!("nats server entered lame duck mode"),
        Event::Draining => info!("nats client draining"),
        Event::Closed => info!("nats connection closed"),
        Event::ServerError(e) => warn!(error = %e, "nats server error"),
        Event::ClientError(e) => warn!(error = %e, "nats client error"),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("could not connect to nats at {url} within {waited_ms} ms: {source}")]
pub struct ConnectError {
    pub url: String,
    pub waited_ms: u128,
    pub source: async_nats::ConnectError,
}

/// Connects to `urls`, retrying the first connection for up to `within`.
pub async fn connect(
    urls: &str,
    client_name: &str,
    within: Duration,
) -> Result<Client, ConnectError> {
    let connect_error = |source| ConnectError {
        url: urls.to_owned(),
        waited_ms: within.as_millis(),
        source,
    };
    let servers = parse_servers(urls).map_err(|e| {
        connect_error(async_nats::ConnectError::with_source(
            ConnectErrorKind::ServerParse,
            e,
        ))
    })?;
    let started = Instant::now();
    let mut last_warned: Option<Instant> = None;
    loop {
        match options(client_name).connect(servers.clone()).await {
            Ok(client) => {
                info!(url = urls, "connected to nats");
                return Ok(client);
            }
            Err(e) if e.kind() == ConnectErrorKind::ServerParse => return Err(connect_error(e)),
            Err(e) if started.elapsed() + RETRY_DELAY < within => {
                if !matches!(last_warned, Some(t) if t.elapsed() < Duration::from_secs(2)) {
                    warn!(url = urls, error = %e, "nats not reachable yet, retrying");
                    last_warned = Some(Instant::now());
                }
                tokio::time::sleep(RETRY_DELAY).await;
            }
            Err(e) => return Err(connect_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_or_many_servers() {
        assert_eq!(parse_servers("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert_eq!(parse_servers("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(parse_servers("").is_err());
        assert!(parse_servers("nats://a:notaport").is_err());
    }

    #[tokio::test]
    async fn gives_up_after_the_first_connect_window() {
        // Nothing listens on port 1.
        let started = std::time::Instant::now();
        let err = connect("nats://127.0.0.1:1", "t", Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("within 600 ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
