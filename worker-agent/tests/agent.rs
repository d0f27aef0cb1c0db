//! The agent's `run` against a real nats-server, with fake Python workers
//! (`fake_worker.py`, stdlib only) that echo every item: requests go in as raw JetStream
//! publishes, replies come back on core NATS, and the KV records are read as an ingress
//! would.

mod common;

use common::*;
use natserve_protocol::envelope;

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
    let routes = open_bucket(&js, routes_bucket_config(&Names::new(NS).unwrap(), 1))
        .await
        .unwrap();
    let stale = RouteRecord {
        route: "/x_y".into(),
        stages: 1,
        names: vec!["Old".into()],
        types: None,
        streams: false,
        durable_replies: false,
        queues: Vec::new(),
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
    let agent = Agent::start_with(&nats, pipeline("/two", 2, 2, None), Prefetch::On);
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
async fn a_batchs_replies_to_a_requester_that_reads_envelopes_come_as_one_message() {
    let nats = NatsServer::start();
    let mut config = pipeline("/echo", 1, 1, None);
    // The first request holds the one worker; the four after it wait and run as one batch.
    config.stages[0].env = Some(vec![BTreeMap::from([(
        "FAKE_SLEEP_MS".to_owned(),
        "300".to_owned(),
    )])]);
    let agent = Agent::start_with(&nats, config, Prefetch::Off);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.env.*").await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let subject = Names::new(NS).unwrap().work_subject("echo", 0);
    let ids = ["e0", "e1", "e2", "e3", "e4"];
    for id in ids {
        let mut h = work_headers(id, &format!("t.reply.env.{id}"));
        h.insert(headers::REPLY_ENVELOPE, "1");
        js.publish_with_headers(subject.clone(), h, Bytes::from(format!("\"{id}\"")))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (mut answered, mut envelopes) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while answered.len() < ids.len() {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("every reply within 15 s")
            .unwrap();
        let Some(count) = headers::get(msg.headers.as_ref(), headers::ENVELOPE) else {
            let id = headers::get(msg.headers.as_ref(), headers::REQUEST_ID).unwrap();
            answered.push((
                id.to_owned(),
                String::from_utf8_lossy(&msg.payload).into_owned(),
            ));
            continue;
        };
        let letters = envelope::decode(&msg.payload).unwrap();
        assert_eq!(count, letters.len().to_string());
        // An envelope goes to the reply subject of its first letter.
        let first = letters[0].header(headers::REQUEST_ID).unwrap();
        assert_eq!(msg.subject.as_str(), format!("t.reply.env.{first}"));
        for letter in &letters {
            assert_eq!(letter.header(headers::STATUS), Some("ok"));
            let id = letter.header(headers::REQUEST_ID).unwrap().to_owned();
            answered.push((id, String::from_utf8_lossy(&letter.body).into_owned()));
        }
        envelopes.push(letters.len());
    }
    answered.sort();
    let want: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.to_string(), format!("\"{id}\"")))
        .collect();
    assert_eq!(answered, want);
    assert!(
        envelopes.iter().any(|&n| n > 1),
        "no batch's replies came together: {envelopes:?}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn an_envelope_of_work_runs_each_letter_in_batches_no_larger_than_the_stage_takes() {
    let nats = NatsServer::start();
    let mut config = pipeline("/echo", 1, 1, None);
    let logs = TempDir::new("envelope");
    let log = logs.0.join("batches.log");
    config.stages[0].env = Some(vec![BTreeMap::from([(
        "FAKE_BATCH_LOG".to_owned(),
        log.to_str().unwrap().to_owned(),
    )])]);
    let agent = Agent::start_with(&nats, config, Prefetch::Off);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.box.*").await.unwrap();
    // Six requests in one message, for a stage whose batches hold at most four.
    let ids = ["w0", "w1", "w2", "w3", "w4", "w5"];
    let js = submit_envelope(&client, "echo", "t.reply.box", &ids).await;
    assert_eq!(
        echoed_replies(&mut sub, &ids).await,
        echoes(&ids),
        "every letter answered once, with its own body"
    );
    let batches = std::fs::read_to_string(&log).unwrap();
    let sizes: Vec<usize> = batches.lines().map(|l| l.split(' ').count()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), ids.len(), "{batches}");
    assert!(sizes.iter().all(|&n| n <= 4), "{batches}");
    // Once every letter is answered, JetStream has the envelope acked: nothing is held
    // to come back after the ack wait.
    let stream = js.get_stream(format!("{NS}_work_echo_0")).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("workers").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_batchs_results_go_to_the_next_stage_as_one_envelope() {
    let nats = NatsServer::start();
    // Through the stream, as between agents: not to stage 1 on this agent directly.
    let mut settings = AgentSettings::new(&nats.url, NS);
    settings.prefetch = Prefetch::Off;
    settings.local_handoffs = false;
    let agent = Agent::start_settings(settings, pipeline("/two", 2, 1, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.two.*").await.unwrap();
    // Four requests in one message: stage 0 runs them as one batch of four.
    let ids = ["h0", "h1", "h2", "h3"];
    let js = submit_envelope(&client, "two", "t.reply.two", &ids).await;
    assert_eq!(
        echoed_replies(&mut sub, &ids).await,
        echoes(&ids),
        "every letter answered once, with its own body"
    );
    // Stage 1's stream took one message for the four: their hand-off envelope.
    let mut stream = js.get_stream(format!("{NS}_work_two_1")).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.last_sequence, 1);
    agent.stop().await.unwrap();
}

/// An agent for `/echo` with one worker whose batches (of at most four) each take
/// `sleep_ms`, logging what it ran to `log`, and no look-ahead.
fn echo_agent(nats: &NatsServer, log: &std::path::Path, sleep_ms: u32) -> Agent {
    let mut config = pipeline("/echo", 1, 1, None);
    config.stages[0].env = Some(vec![BTreeMap::from([
        (
            "FAKE_BATCH_LOG".to_owned(),
            log.to_str().unwrap().to_owned(),
        ),
        ("FAKE_SLEEP_MS".to_owned(), sleep_ms.to_string()),
    ])]);
    Agent::start_with(nats, config, Prefetch::Off)
}

/// What a worker logged it ran, one entry per item.
fn ran(log: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.split_whitespace().map(str::to_owned).collect()
}

/// A NATS server and one ready [`echo_agent`] alone on it, with a client subscribed to
/// the replies `t.reply.<name>.*`.
struct LoneEcho {
    agent: Agent,
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    log: std::path::PathBuf,
    _logs: TempDir,
    _nats: NatsServer,
}

async fn lone_echo(name: &str, sleep_ms: u32) -> LoneEcho {
    let nats = NatsServer::start();
    let logs = TempDir::new(name);
    let log = logs.0.join(format!("{name}.log"));
    let agent = echo_agent(&nats, &log, sleep_ms);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let sub = client.subscribe(format!("t.reply.{name}.*")).await.unwrap();
    LoneEcho {
        agent,
        client,
        sub,
        log,
        _logs: logs,
        _nats: nats,
    }
}

#[tokio::test]
async fn an_agent_gives_back_what_it_will_not_start_soon_while_another_asks_for_work() {
    let nats = NatsServer::start();
    let logs = TempDir::new("hand-back");
    let (slow_log, fast_log) = (logs.0.join("slow.log"), logs.0.join("fast.log"));
    let slow = echo_agent(&nats, &slow_log, 800);
    let fast = echo_agent(&nats, &fast_log, 0);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    // Both idle, both pulling: whichever takes the envelope of twelve starts four, and
    // the other's waiting pull asks for more, so a batch of it goes back to the stream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sub = client.subscribe("t.reply.back.*").await.unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("b{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let js = submit_envelope(&client, "echo", "t.reply.back", &ids).await;
    assert_eq!(
        echoed_replies(&mut sub, &ids).await,
        echoes(&ids),
        "every letter answered once, with its own body"
    );
    let (on_slow, on_fast) = (ran(&slow_log), ran(&fast_log));
    assert_eq!(on_slow.len() + on_fast.len(), 12, "{on_slow:?} {on_fast:?}");
    assert!(!on_fast.is_empty(), "the fast agent ran none: {on_slow:?}");
    let mut stream = js.get_stream(format!("{NS}_work_echo_0")).await.unwrap();
    let published = stream.info().await.unwrap().state.last_sequence;
    assert!(published >= 2, "nothing was given back");
    fast.stop().await.unwrap();
    slow.stop().await.unwrap();
}

#[tokio::test]
async fn a_lone_agent_with_long_batches_returns_its_rest_to_a_short_stream_and_answers_each_once() {
    // The server and the logs live as long as their bindings.
    let LoneEcho {
        agent,
        client,
        mut sub,
        log,
        _logs,
        _nats,
    } = lone_echo("lone", 300).await;
    // One batch first, so the stage knows its batches are long next to a pull.
    let js = submit_envelope(&client, "echo", "t.reply.lone", &["l0"]).await;
    assert_eq!(echoed_replies(&mut sub, &["l0"]).await, echoes(&["l0"]));
    // Twelve in one envelope, batches of four: the eight waiting behind the first batch
    // would wait 300 ms here, and the stream is empty, so they go back to it, where this
    // agent, alone, takes them next. Each letter is still run and answered once.
    let ids: Vec<String> = (1..13).map(|i| format!("l{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    submit_envelope(&client, "echo", "t.reply.lone", &ids).await;
    assert_eq!(echoed_replies(&mut sub, &ids).await, echoes(&ids));
    let mut ran = ran(&log);
    ran.sort();
    let mut all: Vec<String> = std::iter::once("\"l0\"".to_owned())
        .chain(ids.iter().map(|id| format!("\"{id}\"")))
        .collect();
    all.sort();
    assert_eq!(ran, all, "each letter ran once");
    let mut stream = js.get_stream(format!("{NS}_work_echo_0")).await.unwrap();
    assert!(
        stream.info().await.unwrap().state.last_sequence > 2,
        "nothing went back"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_pull_for_a_batch_takes_an_envelope_of_a_batch_not_a_batch_of_envelopes() {
    let LoneEcho {
        agent,
        client,
        mut sub,
        log: _,
        _logs,
        _nats,
    } = lone_echo("sized", 400).await;
    // Four envelopes of a batch (four) each, queued at once. The idle worker's pull takes
    // the first; once it ran, the stage knows its messages carry four letters, so the
    // next pull for a batch of four asks for one message, not four.
    let mut all = Vec::new();
    let mut js = None;
    for e in 0..4 {
        let ids: Vec<String> = (0..4).map(|i| format!("s{e}{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        js = Some(submit_envelope(&client, "echo", "t.reply.sized", &ids).await);
        all.extend(ids.iter().map(|s| s.to_string()));
    }
    let js = js.unwrap();
    let first: Vec<&str> = all[..4].iter().map(String::as_str).collect();
    assert_eq!(echoed_replies(&mut sub, &first).await, echoes(&first));
    // The second batch runs now (400 ms): the agent holds its one envelope.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stream = js.get_stream(format!("{NS}_work_echo_0")).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("workers").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 1, "{info:?}");
    let rest: Vec<&str> = all[4..].iter().map(String::as_str).collect();
    assert_eq!(echoed_replies(&mut sub, &rest).await, echoes(&rest));
    agent.stop().await.unwrap();
}
