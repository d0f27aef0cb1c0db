//! The agent when things fail around it: NATS gone at shutdown, a server that restarts
//! empty, and work held longer than the ack wait (it must run once, not twice).

mod common;

use common::*;

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
    let routes = open_bucket(&js, routes_bucket_config(&names, 1))
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

#[tokio::test]
async fn work_held_longer_than_the_ack_wait_is_kept_not_redelivered() {
    // Each batch runs 1.5 s, past the 1 s ack wait, while the next is prefetched and held.
    let mut config = pipeline("/echo", 1, 1, None);
    config.stages[0].max_batch_size = NonZeroU32::new(1).unwrap();
    let (got, batches) = run_logged(config, Prefetch::On, 1500, &["a", "b", "c"]).await;
    let ok = |b: &str| ("ok".to_owned(), b.to_owned());
    assert_eq!(got, vec![ok("a"), ok("b"), ok("c")]);
    assert_eq!(batches, vec!["a", "b", "c"], "each ran once");
}

#[tokio::test]
async fn a_batch_topping_up_longer_than_the_ack_wait_is_kept_not_redelivered() {
    let mut config = pipeline("/echo", 1, 1, None);
    config.stages[0].max_wait_ms = 1800;
    let (got, batches) = run_logged(config, Prefetch::Off, 0, &["a"]).await;
    assert_eq!(got, vec![("ok".to_owned(), "a".to_owned())]);
    assert_eq!(batches, vec!["a"], "it ran once");
}

/// A request whose first run finished and recorded its reply (`X-Reply-Key`), but whose ack
/// was lost, as when a JetStream cluster elects its consumer's leader, or whose agent died
/// after writing it: its next delivery is answered from the record and acked, not run
/// again (a rerun would count against its deliveries, and run it twice).
#[tokio::test]
async fn a_request_delivered_again_after_its_reply_was_recorded_is_answered_from_the_record() {
    use async_nats::jetstream::consumer::PullConsumer;
    use natserve_protocol::results::reply_key;
    use natserve_protocol::streams::{work_consumer_config, work_stream_config};
    use natserve_protocol::{JobState, Outcome, ResultRecord, Results};

    let nats = NatsServer::start();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let names = Names::new(NS).unwrap();
    let settings = AgentSettings::new(&nats.url, NS);
    // The queue as the agent makes it, and the request's first delivery taken by an
    // agent that then went silent: it never acks.
    let stream = js
        .create_stream(work_stream_config(&names, "echo", 0, &settings.queue))
        .await
        .unwrap();
    let consumer: PullConsumer = stream
        .create_consumer(work_consumer_config())
        .await
        .unwrap();
    let mut sub = client.subscribe("t.reply.recorded").await.unwrap();
    let mut h = work_headers("r1", "t.reply.recorded");
    h.insert(headers::REPLY_KEY, reply_key("r1").as_str());
    js.publish_with_headers(names.work_subject("echo", 0), h, "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut first = consumer.fetch().max_messages(1).messages().await.unwrap();
    let first = first.next().await.unwrap().unwrap();
    assert_eq!(first.info().unwrap().delivered, 1);
    // That run's reply, recorded before the silence.
    let results = Results::open(&js, &names, 1).await.unwrap();
    let record = ResultRecord {
        state: JobState::Done,
        route: "/echo".to_owned(),
        deadline_ms: natserve_protocol::unix_ms() + 10_000,
        written_ms: natserve_protocol::unix_ms(),
        status: Some(Outcome::Ok),
        content_type: Some("application/json".to_owned()),
        batch_sizes: Some("1".to_owned()),
    };
    results
        .record_reply(
            &reply_key("r1"),
            &record,
            b"recorded",
            Duration::from_secs(30),
        )
        .await
        .unwrap();

    let logs = TempDir::new("recorded");
    let log = logs.0.join("batches.log");
    let mut config = pipeline("/echo", 1, 1, None);
    config.stages[0].env = Some(vec![BTreeMap::from([(
        "FAKE_BATCH_LOG".to_owned(),
        log.to_str().unwrap().to_owned(),
    )])]);
    let agent = Agent::start_settings(settings, config);
    wait_ready(&client, 1).await;
    // Redelivered after the ack wait, to the agent.
    let got = replies(&mut sub, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![("ok".to_owned(), "recorded".to_owned())]);
    // Acked: nothing is left in the queue, and nothing else answers.
    assert!(replies(&mut sub, 1, Duration::from_millis(1500))
        .await
        .is_empty());
    let mut stream = js.get_stream(names.stream("echo", 0)).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    agent.stop().await.unwrap();
    let batches = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(batches, "", "it was not run again");
}
