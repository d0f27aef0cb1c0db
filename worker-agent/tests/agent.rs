//! The agent's `run` against a real nats-server, with fake Python workers
//! (`fake_worker.py`, stdlib only) that echo every item: requests go in as raw JetStream
//! publishes, replies come back on core NATS, and the KV records are read as an ingress
//! would.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use natserve_agent::{run, AgentError, AgentSettings};
use natserve_protocol::buckets::{agents_bucket_config, open_bucket, routes_bucket_config};
use natserve_protocol::{
    headers, AgentConfig, AgentRecord, Names, RouteRecord, RouteSpec, StageSpec,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NS: &str = "t";

/// `$NATSERVE_NATS_SERVER`, else `nats-server` on PATH, else the repo's `.venv`.
fn nats_server_binary() -> PathBuf {
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
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
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
struct NatsServer {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl NatsServer {
    fn start() -> Self {
        Self::start_on("-1")
    }

    /// Kills the server and starts a fresh one on the same port with an empty store, as
    /// a server with memory storage comes back: no streams, consumers or buckets.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.url.rsplit(':').next().unwrap().to_owned();
        let fresh = Self::start_on(&port);
        let old = std::mem::replace(self, fresh);
        drop(old); // its child is already gone
    }

    fn start_on(port: &str) -> Self {
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

fn fake_worker_cmd() -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_worker.py");
    vec!["python3".to_owned(), script.to_owned()]
}

/// A config hosting every stage of `route` (one name per stage), `num` workers each.
fn pipeline(route: &str, stages: u32, num: u32, env: Option<(&str, &str)>) -> AgentConfig {
    let names: Vec<String> = (0..stages).map(|i| format!("S{i}")).collect();
    let env = env.map(|(k, v)| vec![BTreeMap::from([(k.to_owned(), v.to_owned())]); num as usize]);
    AgentConfig {
        worker_cmd: fake_worker_cmd(),
        routes: vec![RouteSpec {
            route: route.to_owned(),
            names: names.clone(),
            types: None,
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
struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    fn start(nats: &NatsServer, config: AgentConfig) -> Self {
        Self::start_with(nats, config, false)
    }

    fn start_with(nats: &NatsServer, config: AgentConfig, prefetch: bool) -> Self {
        let mut settings = AgentSettings::new(&nats.url, NS);
        settings.prefetch = prefetch;
        Self::start_settings(settings, config)
    }

    fn start_settings(mut settings: AgentSettings, config: AgentConfig) -> Self {
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

    async fn stop(mut self) -> Result<(), AgentError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("agent stops")
            .unwrap()
    }
}

/// Waits until an agent record shows every hosted stage with `ready` workers.
async fn wait_ready(client: &async_nats::Client, ready: u32) -> AgentRecord {
    let js = async_nats::jetstream::new(client.clone());
    let names = Names::new(NS).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(agents) = open_bucket(&js, agents_bucket_config(&names)).await {
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
async fn submit(
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
async fn replies(
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

#[tokio::test]
async fn answers_a_request_and_reports_idle_workers_as_free() {
    let nats = NatsServer::start();
    let agent = Agent::start(&nats, pipeline("/echo", 1, 2, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    let record = wait_ready(&client, 2).await;
    // Idle workers wait in their pull loops, not in the pool: they are still free.
    let heartbeat = Duration::from_millis(record.heartbeat_ms * 2);
    tokio::time::sleep(heartbeat).await;
    let record = wait_ready(&client, 2).await;
    assert_eq!(
        (record.stages[0].ready, record.stages[0].free),
        (2, 2),
        "{record:?}"
    );

    let mut sub = client.subscribe("t.reply.echo").await.unwrap();
    submit(&client, "echo", Some("r1"), "t.reply.echo", "{\"x\": 1}").await;
    let got = replies(&mut sub, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![("ok".to_owned(), "{\"x\": 1}".to_owned())]);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_for_a_worker_that_died_idle_runs_on_its_replacement() {
    let nats = NatsServer::start();
    let pids = TempDir::new("pids");
    let pid_dir = pids.0.to_str().unwrap().to_owned();
    let agent = Agent::start(
        &nats,
        pipeline("/echo", 1, 1, Some(("FAKE_PID_DIR", &pid_dir))),
    );
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    // Let the pull loop take the worker and wait for work with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = std::fs::read_dir(&pids.0)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let killed = Command::new("kill").arg("-9").arg(&pid).status().unwrap();
    assert!(killed.success());
    // Dead, and its replacement is not up yet (restarts back off at least 200 ms).
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut sub = client.subscribe("t.reply.idle").await.unwrap();
    for i in 0..6 {
        submit(
            &client,
            "echo",
            Some(&format!("r{i}")),
            "t.reply.idle",
            &i.to_string(),
        )
        .await;
    }
    let mut got = replies(&mut sub, 6, Duration::from_secs(15)).await;
    got.sort();
    let expected: Vec<_> = (0..6).map(|i| ("ok".to_owned(), i.to_string())).collect();
    assert_eq!(
        got, expected,
        "every request succeeds on the replacement worker"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn work_without_a_request_id_is_answered_not_dropped_as_a_duplicate() {
    let nats = NatsServer::start();
    let agent = Agent::start(&nats, pipeline("/two", 2, 1, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.anon").await.unwrap();
    submit(&client, "two", None, "t.reply.anon", "1").await;
    submit(&client, "two", None, "t.reply.anon", "2").await;
    let got = replies(&mut sub, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2, "both requests are answered: {got:?}");
    for (status, body) in &got {
        assert_eq!(status, "client_error", "{body}");
        assert!(body.contains("X-Request-Id"), "{body}");
    }
    // With an id, the same pipeline runs both stages.
    submit(&client, "two", Some("r1"), "t.reply.anon", "3").await;
    let got = replies(&mut sub, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![("ok".to_owned(), "3".to_owned())]);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_route_whose_slug_a_live_agent_serves_for_another_route_is_refused() {
    let nats = NatsServer::start();
    let first = Agent::start(&nats, pipeline("/a/b", 1, 1, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;

    let second = Agent::start(&nats, pipeline("/a_b", 1, 1, None));
    let err = tokio::time::timeout(Duration::from_secs(20), second.task)
        .await
        .expect("the second agent gives up")
        .unwrap()
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/a/b") && text.contains("/a_b"), "{text}");
    first.stop().await.unwrap();
}

#[tokio::test]
async fn a_stale_route_record_nobody_serves_is_replaced() {
    let nats = NatsServer::start();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let routes = open_bucket(&js, routes_bucket_config(&Names::new(NS).unwrap()))
        .await
        .unwrap();
    let stale = RouteRecord {
        route: "/x_y".into(),
        stages: 1,
        names: vec!["Old".into()],
        types: None,
    };
    routes
        .put("x_y", serde_json::to_vec(&stale).unwrap().into())
        .await
        .unwrap();

    let agent = Agent::start(&nats, pipeline("/x/y", 1, 1, None));
    wait_ready(&client, 1).await;
    let value = routes.get("x_y").await.unwrap().unwrap();
    let record: RouteRecord = serde_json::from_slice(&value).unwrap();
    assert_eq!(record.route, "/x/y");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn prefetching_loops_answer_every_request() {
    let nats = NatsServer::start();
    let agent = Agent::start_with(&nats, pipeline("/two", 2, 2, None), true);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 2).await;
    let mut sub = client.subscribe("t.reply.pre").await.unwrap();
    for i in 0..20 {
        submit(
            &client,
            "two",
            Some(&format!("r{i}")),
            "t.reply.pre",
            &i.to_string(),
        )
        .await;
    }
    let got = replies(&mut sub, 20, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 20, "{got:?}");
    assert!(got.iter().all(|(status, _)| status == "ok"), "{got:?}");
    agent.stop().await.unwrap();
}

/// Headers of a work message to stage 0 of `slug`, due in 10 s.
fn work_headers(id: &str, reply_to: &str) -> HeaderMap {
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

#[tokio::test]
async fn a_reply_subject_outside_the_reply_prefix_is_never_published_to() {
    let nats = NatsServer::start();
    let agent = Agent::start(&nats, pipeline("/echo", 1, 1, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    // Whatever the agent would publish to these, a core subscription sees.
    let mut evil = client.subscribe("evil.>").await.unwrap();
    let mut kv = client.subscribe("$KV.t_routes.>").await.unwrap();
    let mut work = client.subscribe("t.work.>").await.unwrap();
    let mut good = client.subscribe("t.reply.good.*").await.unwrap();
    for (id, to) in [
        ("r1", "evil.target"),
        ("r2", "$KV.t_routes.echo"),
        ("r3", "t.work.echo.0"),
        ("r4", "t.reply.*"),
        ("r5", "t.reply.good.r5"),
    ] {
        submit(&client, "echo", Some(id), to, id).await;
    }
    let got = replies(&mut good, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![("ok".to_owned(), "r5".to_owned())]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let none = Duration::from_millis(100);
    assert!(tokio::time::timeout(none, evil.next()).await.is_err());
    assert!(tokio::time::timeout(none, kv.next()).await.is_err());
    let submitted = replies(&mut work, 10, Duration::from_millis(300)).await;
    assert_eq!(submitted.len(), 5, "only our own five submissions");
    // Terminated, not left to be redelivered.
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("t_work_echo_0").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_whose_worker_dies_answers_its_healthy_items_and_the_poison_alone() {
    let nats = NatsServer::start();
    let logs = TempDir::new("batches");
    let log = logs.0.join("batches.log");
    let mut config = pipeline("/echo", 1, 1, None);
    config.stages[0].max_wait_ms = 300;
    config.stages[0].env = Some(vec![BTreeMap::from([
        ("FAKE_CRASH_ON".to_owned(), "poison".to_owned()),
        (
            "FAKE_BATCH_LOG".to_owned(),
            log.to_str().unwrap().to_owned(),
        ),
    ])]);
    let agent = Agent::start(&nats, config);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.poison").await.unwrap();
    for body in ["h1", "poison", "h2", "h3"] {
        submit(&client, "echo", Some(body), "t.reply.poison", body).await;
    }
    let mut got = replies(&mut sub, 4, Duration::from_secs(20)).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("ok".to_owned(), "h1".to_owned()),
            ("ok".to_owned(), "h2".to_owned()),
            ("ok".to_owned(), "h3".to_owned()),
            (
                "server_error".to_owned(),
                "internal error: worker process failed while running this request".to_owned()
            ),
        ]
    );
    let batches = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = batches.lines().collect();
    assert!(
        lines[0].split(' ').count() > 1 && lines[0].contains("poison"),
        "the poison shared its first batch: {lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("poison")).count(),
        2,
        "it ran twice, the second time alone: {lines:?}"
    );
    assert!(lines.contains(&"poison"), "{lines:?}");
    // Its second replacement serves.
    submit(&client, "echo", Some("after"), "t.reply.poison", "after").await;
    let got = replies(&mut sub, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![("ok".to_owned(), "after".to_owned())]);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn stops_within_its_grace_and_margin_when_nats_is_gone() {
    let mut nats = NatsServer::start();
    let settings = AgentSettings::new(&nats.url, NS);
    let agent = Agent::start_settings(settings, pipeline("/echo", 1, 2, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 2).await;
    let _ = nats.child.kill();
    let _ = nats.child.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    agent.stop().await.unwrap();
    let took = started.elapsed();
    // The test's grace is 2 s; the fake workers exit at once on SIGTERM.
    let bound = Duration::from_secs(2) + natserve_agent::DRAIN_MARGIN;
    assert!(took <= bound, "took {took:?}, more than {bound:?}");
}

#[tokio::test]
async fn recreates_its_queue_and_records_after_the_server_restarts_empty() {
    let mut nats = NatsServer::start();
    let agent = Agent::start(&nats, pipeline("/echo", 1, 1, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.restart.*").await.unwrap();
    submit(
        &client,
        "echo",
        Some("before"),
        "t.reply.restart.a",
        "before",
    )
    .await;
    assert_eq!(replies(&mut sub, 1, Duration::from_secs(10)).await.len(), 1);

    nats.restart();
    let restarted = Instant::now();
    let js = async_nats::jetstream::new(client.clone());
    let subject = Names::new(NS).unwrap().work_subject("echo", 0);
    let mut answered = None;
    for i in 0.. {
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "no request succeeded within 10 s of the restart"
        );
        let id = format!("after{i}");
        let h = work_headers(&id, &format!("t.reply.restart.{id}"));
        // Bounded: this client may itself still be reconnecting.
        let publish = async {
            match js
                .publish_with_headers(subject.clone(), h, "x".into())
                .await
            {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        };
        let published = tokio::time::timeout(Duration::from_millis(500), publish)
            .await
            .unwrap_or(false);
        if published
            && tokio::time::timeout(Duration::from_secs(2), sub.next())
                .await
                .is_ok_and(|m| m.is_some())
        {
            answered = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered = answered.unwrap();
    eprintln!("first answer {answered:?} after the restart");
    assert!(answered < Duration::from_secs(5), "{answered:?}");
    // Its route record and heartbeat are back too, for ingresses to see.
    let names = Names::new(NS).unwrap();
    let routes = open_bucket(&js, routes_bucket_config(&names))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while routes.get("echo").await.ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "route record not written again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_ready(&client, 1).await;
    agent.stop().await.unwrap();
}

/// Runs `config` (one stage, one worker, batches logged) on `prefetch`, submits `bodies`
/// and returns the replies and the batches the worker ran.
async fn run_logged(
    mut config: AgentConfig,
    prefetch: bool,
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

#[tokio::test]
async fn work_held_longer_than_the_ack_wait_is_kept_not_redelivered() {
    // Each batch runs 1.5 s, past the 1 s ack wait, while the next is prefetched and held.
    let mut config = pipeline("/echo", 1, 1, None);
    config.stages[0].max_batch_size = NonZeroU32::new(1).unwrap();
    let (got, batches) = run_logged(config, true, 1500, &["a", "b", "c"]).await;
    let ok = |b: &str| ("ok".to_owned(), b.to_owned());
    assert_eq!(got, vec![ok("a"), ok("b"), ok("c")]);
    assert_eq!(batches, vec!["a", "b", "c"], "each ran once");
}

#[tokio::test]
async fn a_batch_topping_up_longer_than_the_ack_wait_is_kept_not_redelivered() {
    let mut config = pipeline("/echo", 1, 1, None);
    config.stages[0].max_wait_ms = 1800;
    let (got, batches) = run_logged(config, false, 0, &["a"]).await;
    assert_eq!(got, vec![("ok".to_owned(), "a".to_owned())]);
    assert_eq!(batches, vec!["a"], "it ran once");
}
