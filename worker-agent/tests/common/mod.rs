//! Harness of the agent's integration tests: a real nats-server per test (killed on
//! drop), the agent's `run` with fake Python workers (`fake_worker.py`, stdlib only), and
//! raw JetStream submits with core-NATS replies, read as an ingress would.

#![allow(dead_code, unused_imports)]

pub use std::collections::BTreeMap;
pub use std::num::NonZeroU32;
pub use std::path::PathBuf;
pub use std::process::{Child, Command, Stdio};
pub use std::time::{Duration, Instant};

pub use async_nats::HeaderMap;
pub use bytes::Bytes;
pub use futures::StreamExt;
pub use natserve_agent::{run, AgentError, AgentSettings};
pub use natserve_protocol::buckets::{agents_bucket_config, open_bucket, routes_bucket_config};
pub use natserve_protocol::{
    headers, AgentConfig, AgentRecord, Names, RouteRecord, RouteSpec, StageSpec,
};
pub use natserve_scheduler::Prefetch;
pub use tokio::sync::oneshot;
pub use tokio::task::JoinHandle;

pub const NS: &str = "t";

/// `$NATSERVE_NATS_SERVER`, else `nats-server` on PATH, else the repo's `.venv`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATSERVE_NATS_SERVER") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    let venv = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/nats-server"
    ));
    on_path
        .or_else(|| venv.is_file().then_some(venv))
        .expect("nats-server not found: set NATSERVE_NATS_SERVER or put it on PATH")
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "natserve-agent-{what}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A nats-server with JetStream on a port of its choosing, killed on drop.
pub struct NatsServer {
    pub child: Child,
    pub url: String,
    pub _dir: TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_on("-1")
    }

    /// Kills the server and starts a fresh one on the same port with an empty store, as
    /// a server with memory storage comes back: no streams, consumers or buckets.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.url.rsplit(':').next().unwrap().to_owned();
        let fresh = Self::start_on(&port);
        let old = std::mem::replace(self, fresh);
        drop(old); // its child is already gone
    }

    pub fn start_on(port: &str) -> Self {
        let dir = TempDir::new("nats");
        let conf = dir.0.join("nats.conf");
        let store = dir.0.join("js");
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: {store:?} }}\n"),
        )
        .unwrap();
        let mut child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&conf)
            .arg("--ports_file_dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let ports = dir.0.join(format!("nats-server_{}.ports", child.id()));
        let started = Instant::now();
        let url = loop {
            let text = std::fs::read_to_string(&ports).unwrap_or_default();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                break v["nats"][0].as_str().unwrap().to_owned();
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "nats-server exited early"
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn fake_worker_cmd() -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_worker.py");
    vec!["python3".to_owned(), script.to_owned()]
}

/// A config hosting every stage of `route` (one name per stage), `num` workers each.
pub fn pipeline(route: &str, stages: u32, num: u32, env: Option<(&str, &str)>) -> AgentConfig {
    let names: Vec<String> = (0..stages).map(|i| format!("S{i}")).collect();
    let env = env.map(|(k, v)| vec![BTreeMap::from([(k.to_owned(), v.to_owned())]); num as usize]);
    AgentConfig {
        worker_cmd: fake_worker_cmd(),
        routes: vec![RouteSpec {
            route: route.to_owned(),
            names: names.clone(),
            types: None,
            streams: false,
            queues: Vec::new(),
        }],
        stages: (0..stages)
            .map(|stage| StageSpec {
                route: route.to_owned(),
                stage,
                name: names[stage as usize].clone(),
                worker: format!("fake:{}", names[stage as usize]),
                num: NonZeroU32::new(num).unwrap(),
                max_batch_size: NonZeroU32::new(4).unwrap(),
                max_wait_ms: 2,
                timeout_ms: 0,
                env: env.clone(),
                mime: "application/json".to_owned(),
            })
            .collect(),
    }
}

/// An agent's `run` on its own task, stopped by [`Agent::stop`].
pub struct Agent {
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    pub fn start(nats: &NatsServer, config: AgentConfig) -> Self {
        Self::start_with(nats, config, Prefetch::Auto)
    }

    pub fn start_with(nats: &NatsServer, config: AgentConfig, prefetch: Prefetch) -> Self {
        let mut settings = AgentSettings::new(&nats.url, NS);
        settings.prefetch = prefetch;
        Self::start_settings(settings, config)
    }

    pub fn start_settings(mut settings: AgentSettings, config: AgentConfig) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "off".into()),
            )
            .with_test_writer()
            .try_init();
        settings.heartbeat = Duration::from_millis(200);
        settings.grace = Duration::from_secs(2);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(settings, config, async {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) -> Result<(), AgentError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("agent stops")
            .unwrap()
    }
}

/// Waits until an agent record shows every hosted stage with `ready` workers.
pub async fn wait_ready(client: &async_nats::Client, ready: u32) -> AgentRecord {
    let js = async_nats::jetstream::new(client.clone());
    let names = Names::new(NS).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(agents) = open_bucket(&js, agents_bucket_config(&names, 1)).await {
            let keys: Vec<String> = match agents.keys().await {
                Ok(keys) => keys.filter_map(|k| async { k.ok() }).collect().await,
                Err(_) => Vec::new(),
            };
            for key in keys {
                if let Ok(Some(value)) = agents.get(&key).await {
                    let record: AgentRecord = serde_json::from_slice(&value).unwrap();
                    if record.stages.iter().all(|s| s.ready == ready) {
                        return record;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "agent not ready in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes one work message to stage 0 of `slug`; `id: None` leaves out X-Request-Id.
pub async fn submit(
    client: &async_nats::Client,
    slug: &str,
    id: Option<&str>,
    reply_to: &str,
    body: &str,
) {
    let js = async_nats::jetstream::new(client.clone());
    let mut h = HeaderMap::new();
    if let Some(id) = id {
        h.insert(headers::REQUEST_ID, id);
        h.insert(headers::MSG_ID, format!("{id}.0").as_str());
    }
    h.insert(headers::REPLY_TO, reply_to);
    h.insert(
        headers::DEADLINE,
        (natserve_protocol::unix_ms() + 10_000).to_string(),
    );
    let subject = Names::new(NS).unwrap().work_subject(slug, 0);
    js.publish_with_headers(subject, h, Bytes::from(body.to_owned()))
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Collects up to `n` replies, waiting at most `within` for all of them.
pub async fn replies(
    sub: &mut async_nats::Subscriber,
    n: usize,
    within: Duration,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(msg)) => {
                let status = headers::get(msg.headers.as_ref(), headers::STATUS)
                    .unwrap_or("")
                    .to_owned();
                out.push((status, String::from_utf8_lossy(&msg.payload).into_owned()));
            }
            _ => break,
        }
    }
    out
}

/// Headers of a work message to stage 0 of `slug`, due in 10 s.
pub fn work_headers(id: &str, reply_to: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::REQUEST_ID, id);
    h.insert(headers::MSG_ID, format!("{id}.0").as_str());
    h.insert(headers::REPLY_TO, reply_to);
    h.insert(
        headers::DEADLINE,
        (natserve_protocol::unix_ms() + 10_000).to_string(),
    );
    h
}

/// and returns the replies and the batches the worker ran.
pub async fn run_logged(
    mut config: AgentConfig,
    prefetch: Prefetch,
    sleep_ms: u64,
    bodies: &[&str],
) -> (Vec<(String, String)>, Vec<String>) {
    let nats = NatsServer::start();
    let logs = TempDir::new("held");
    let log = logs.0.join("batches.log");
    config.stages[0].env = Some(vec![BTreeMap::from([
        ("FAKE_SLEEP_MS".to_owned(), sleep_ms.to_string()),
        (
            "FAKE_BATCH_LOG".to_owned(),
            log.to_str().unwrap().to_owned(),
        ),
    ])]);
    let agent = Agent::start_with(&nats, config, prefetch);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.held").await.unwrap();
    for body in bodies {
        submit(&client, "echo", Some(body), "t.reply.held", body).await;
    }
    let mut got = replies(&mut sub, bodies.len(), Duration::from_secs(20)).await;
    // Anything run twice would answer twice: give a second answer time to come.
    got.extend(replies(&mut sub, 1, Duration::from_millis(1500)).await);
    got.sort();
    agent.stop().await.unwrap();
    let batches = std::fs::read_to_string(&log).unwrap_or_default();
    (got, batches.lines().map(str::to_owned).collect())
}

/// Publishes one work message to stage 0 of `slug` holding a request per id (body: the
/// id as a JSON string, replies to `<reply_prefix>.<id>`); the JetStream context used.
pub async fn submit_envelope(
    client: &async_nats::Client,
    slug: &str,
    reply_prefix: &str,
    ids: &[&str],
) -> async_nats::jetstream::Context {
    let letters: Vec<natserve_protocol::envelope::Letter> = ids
        .iter()
        .map(|id| {
            let h = work_headers(id, &format!("{reply_prefix}.{id}"));
            natserve_protocol::envelope::Letter::new(&h, Bytes::from(format!("\"{id}\"")))
        })
        .collect();
    let mut h = HeaderMap::new();
    h.insert(headers::ENVELOPE, letters.len().to_string());
    let js = async_nats::jetstream::new(client.clone());
    let subject = Names::new(NS).unwrap().work_subject(slug, 0);
    js.publish_with_headers(
        subject,
        h,
        natserve_protocol::envelope::encode(&letters).unwrap(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    js
}

/// The replies to `ids`, sorted, within 15 s.
pub async fn echoed_replies(
    sub: &mut async_nats::Subscriber,
    ids: &[&str],
) -> Vec<(String, String)> {
    let mut got = replies(sub, ids.len(), Duration::from_secs(15)).await;
    got.sort();
    got
}

/// What [`echoed_replies`] reads when each of `ids` is echoed once, sorted as it sorts.
pub fn echoes(ids: &[&str]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = ids
        .iter()
        .map(|id| ("ok".to_owned(), format!("\"{id}\"")))
        .collect();
    out.sort();
    out
}
