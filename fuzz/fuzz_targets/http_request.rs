//! The ingress's HTTP handling on arbitrary bytes, as one HTTP/1 connection: whatever a
//! client sends, the answer is a 4xx (or the 503 of "NATS unavailable", since no NATS
//! runs here), or a closed connection; never a 5xx of our own, never a panic.
//!
//! The app is real: its router, route table (one route with a live agent, so requests
//! get as far as reading their body and publishing), limits and status mapping; its NATS
//! client never connects, so a request that passes every check ends at the publish.

#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use libfuzzer_sys::fuzz_target;
use natserve_ingress::drain::Drain;
use natserve_ingress::http::{router, App};
use natserve_ingress::metrics::Metrics;
use natserve_ingress::replies::Replies;
use natserve_ingress::routes::RouteTable;
use natserve_ingress::submit::Submitter;
use natserve_ingress::Config;
use natserve_protocol::payloads::Payloads;
use natserve_protocol::{AgentRecord, Names, RouteRecord, StageLoad};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
});

static APP: LazyLock<Arc<App>> = LazyLock::new(|| RUNTIME.block_on(app()));

async fn app() -> Arc<App> {
    let names = Names::new("fuzz").unwrap();
    // Nothing listens on port 1: the client stays disconnected, and says so at once.
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("nats://127.0.0.1:1")
        .await
        .unwrap();
    let replies = Replies::new(names.reply_prefix("fuzz"));
    let routes = RouteTable::shared();
    {
        let mut table = routes.write().unwrap();
        let route = RouteRecord {
            route: "/inference".into(),
            stages: 1,
            names: vec!["W".into()],
            types: None,
            streams: false,
            durable_replies: false,
            queues: Vec::new(),
        };
        table.put_route("inference", route, Instant::now());
        let agent = AgentRecord {
            id: "a".into(),
            host: "h".into(),
            pid: 1,
            heartbeat_ms: 3_600_000,
            stages: vec![StageLoad {
                route: "/inference".into(),
                stage: 0,
                name: "W".into(),
                workers: 1,
                ready: 1,
                free: 1,
            }],
        };
        table.put_agent("a", agent, Instant::now());
    }
    let metrics = Metrics::new().unwrap();
    let config = Config {
        namespace: "fuzz".into(),
        max_body_size: 4096,
        timeout: Duration::from_millis(200),
        ..Config::new("nats://127.0.0.1:1")
    };
    Arc::new(App {
        drain: Drain::new(metrics.inflight()),
        submitter: Submitter::new(
            client.clone(),
            names.clone(),
            replies,
            Payloads::new(async_nats::jetstream::new(client), &names),
        ),
        // No server to open the results bucket on: asynchronous jobs answer 503 here.
        results: None,
        config,
        names,
        routes,
        metrics,
    })
}

/// Status codes of every response in `bytes`, one per `HTTP/1.1 NNN` status line.
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // `/metrics` asks JetStream for queue depths, which waits out the client's request
    // timeout without a server: covered by the integration tests instead.
    if data.windows(8).any(|w| w == b"/metrics") {
        return;
    }
    let app = APP.clone();
    RUNTIME.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let service = TowerToHyperService::new(router(app));
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service);
        let served = tokio::spawn(connection);
        let exchange = async {
            client.write_all(data).await.ok()?;
            client.shutdown().await.ok()?;
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.ok()?;
            Some(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("the ingress answered or closed within 5 s");
        served.abort();
        for status in statuses(&answer.unwrap_or_default()) {
            assert!(
                status < 500 || status == 503,
                "answered {status} to {:?}",
                String::from_utf8_lossy(data)
            );
        }
    });
});
