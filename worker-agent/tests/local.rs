//! Hand-offs between the stages of one agent: a result goes to the next stage's workers
//! here without the stage's stream, and its input is acked only once the next stage is
//! done with it.

mod common;

use async_nats::jetstream::consumer::PullConsumer;
use common::*;

/// The stream of stage `stage` of `slug`.
fn stream(slug: &str, stage: u32) -> String {
    format!("{NS}_work_{slug}_{stage}")
}

/// The stage's shared consumer, as the agents pull it.
async fn consumer(client: &async_nats::Client, slug: &str, stage: u32) -> PullConsumer {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(stream(slug, stage)).await.unwrap();
    stream.get_consumer("workers").await.unwrap()
}

/// `/two`, one worker a stage, whose stage 1 runs one request at a time, `ms` each.
fn slow_second_stage(ms: u32) -> AgentConfig {
    let mut config = pipeline("/two", 2, 1, None);
    config.stages[1].max_batch_size = NonZeroU32::new(1).unwrap();
    config.stages[1].env = Some(vec![BTreeMap::from([(
        "FAKE_SLEEP_MS".to_owned(),
        ms.to_string(),
    )])]);
    config
}

/// Waits until stage 0 of `slug` holds nothing unacked: every input settled.
async fn all_settled(client: &async_nats::Client, slug: &str) -> u64 {
    let mut first = consumer(client, slug, 0).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = first.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            return info.num_redelivered as u64;
        }
        assert!(tokio::time::Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_on_one_agent_hands_on_without_the_next_stages_stream() {
    let nats = NatsServer::start();
    let agent = Agent::start(&nats, pipeline("/two", 2, 1, None));
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.two.*").await.unwrap();
    // One at a time: stage 1's worker is free for each.
    for i in 0..10 {
        let id = format!("l{i}");
        let body = format!("\"{id}\"");
        submit(
            &client,
            "two",
            Some(&id),
            &format!("t.reply.two.{id}"),
            &body,
        )
        .await;
        assert_eq!(echoed_replies(&mut sub, &[&id]).await, echoes(&[&id]));
    }
    assert_eq!(all_settled(&client, "two").await, 0, "nothing ran twice");
    let js = async_nats::jetstream::new(client.clone());
    let mut next = js.get_stream(stream("two", 1)).await.unwrap();
    assert_eq!(
        next.info().await.unwrap().state.last_sequence,
        0,
        "stage 1's stream carried none of them"
    );
    // A burst: what stage 1 has no room for here goes through its stream; each request
    // is answered once either way.
    let ids: Vec<String> = (0..40).map(|i| format!("b{i}")).collect();
    for id in &ids {
        let body = format!("\"{id}\"");
        submit(
            &client,
            "two",
            Some(id),
            &format!("t.reply.two.{id}"),
            &body,
        )
        .await;
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(echoed_replies(&mut sub, &ids).await, echoes(&ids));
    assert_eq!(all_settled(&client, "two").await, 0, "nothing ran twice");
    let late = replies(&mut sub, 1, Duration::from_millis(300)).await;
    assert!(late.is_empty(), "answered twice: {late:?}");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_of_inputs_is_acked_only_once_the_next_stage_settled_every_letter() {
    let nats = NatsServer::start();
    // Stage 0 runs the four as one batch; stage 1 one at a time, 300 ms each.
    let config = slow_second_stage(300);
    let agent = Agent::start(&nats, config);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.env.*").await.unwrap();
    let ids = ["e0", "e1", "e2", "e3"];
    submit_envelope(&client, "two", "t.reply.env", &ids).await;
    let first = replies(&mut sub, 1, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    // The first letter is done at stage 1, the others are not: the envelope they came
    // in is still unacked, so a dead agent's letters would all be delivered again.
    let mut inputs = consumer(&client, "two", 0).await;
    let info = inputs.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 1, "{info:?}");
    let mut got = first;
    got.extend(replies(&mut sub, 3, Duration::from_secs(10)).await);
    got.sort();
    assert_eq!(got, echoes(&ids));
    assert_eq!(all_settled(&client, "two").await, 0, "nothing ran twice");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_whose_worker_died_at_the_next_stage_runs_again_from_the_stage_before() {
    let nats = NatsServer::start();
    let logs = TempDir::new("local-crash");
    let log = logs.0.join("stage0.log");
    let mut config = pipeline("/two", 2, 1, None);
    config.stages[0].env = Some(vec![BTreeMap::from([(
        "FAKE_BATCH_LOG".to_owned(),
        log.to_str().unwrap().to_owned(),
    )])]);
    config.stages[1].max_wait_ms = 200;
    config.stages[1].env = Some(vec![BTreeMap::from([(
        "FAKE_CRASH_ON".to_owned(),
        "\"poison\"".to_owned(),
    )])]);
    let agent = Agent::start(&nats, config);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.crash.*").await.unwrap();
    let ids = ["c1", "poison", "c2", "c3"];
    for id in ids {
        let body = format!("\"{id}\"");
        submit(
            &client,
            "two",
            Some(id),
            &format!("t.reply.crash.{id}"),
            &body,
        )
        .await;
    }
    let mut got = replies(&mut sub, 4, Duration::from_secs(20)).await;
    got.sort();
    let mut want = echoes(&["c1", "c2", "c3"]);
    want.push((
        "server_error".to_owned(),
        "internal error: worker process failed while running this request".to_owned(),
    ));
    want.sort();
    assert_eq!(got, want);
    // The poison ran at stage 0 again (its letter's input was given back), alone.
    let ran = std::fs::read_to_string(&log).unwrap();
    let poison_runs: Vec<&str> = ran.lines().filter(|l| l.contains("poison")).collect();
    assert!(poison_runs.len() >= 2, "stage 0 ran: {ran}");
    assert_eq!(poison_runs.last(), Some(&"\"poison\""), "alone: {ran}");
    all_settled(&client, "two").await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_pulls_only_while_the_next_stage_here_keeps_up() {
    let nats = NatsServer::start();
    // Stage 1 runs one at a time, 200 ms each: stage 0 could run all twenty at once.
    let config = slow_second_stage(200);
    let agent = Agent::start(&nats, config);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;
    let mut sub = client.subscribe("t.reply.slow.*").await.unwrap();
    let ids: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    for id in &ids {
        let body = format!("\"{id}\"");
        submit(
            &client,
            "two",
            Some(id),
            &format!("t.reply.slow.{id}"),
            &body,
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What stage 1 will not start soon is still in stage 0's stream, for any agent.
    // Stage 1's sleep is a floor: at most three settled by now (two, and one of
    // margin for a slow submit). The agent holds at most twelve: stage 1's one
    // running and its room of two, which a batch of stage 0 can overfill by four;
    // stage 0's batch of four and the two it pulls ahead. So at least five never
    // left the stream; without the bound stage 0 would have taken all twenty.
    let mut inputs = consumer(&client, "two", 0).await;
    let info = inputs.info().await.unwrap();
    assert!(info.num_ack_pending <= 12, "{info:?}");
    assert!(info.num_pending >= 5, "{info:?}");
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(echoed_replies(&mut sub, &ids).await, echoes(&ids));
    assert_eq!(all_settled(&client, "two").await, 0, "nothing ran twice");
    agent.stop().await.unwrap();
}
