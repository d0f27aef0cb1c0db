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
