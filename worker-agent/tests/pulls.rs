//! How many pull requests an agent sends the broker for the work it runs.

mod common;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_stage_that_keeps_work_ahead_sends_a_pull_request_per_few_messages() {
    let nats = NatsServer::start();
    let mut config = pipeline("/fast", 1, 1, None);
    config.stages[0].max_batch_size = NonZeroU32::new(1).unwrap();
    // A batch ahead of the one running: the room a waiting pull asks for too.
    let agent = Agent::start_with(&nats, config, Prefetch::On);
    let client = async_nats::connect(&nats.url).await.unwrap();
    wait_ready(&client, 1).await;

    let mut pulls = client
        .subscribe(format!(
            "$JS.API.CONSUMER.MSG.NEXT.{NS}_work_fast_0.workers"
        ))
        .await
        .unwrap();
    let counted = Arc::new(AtomicUsize::new(0));
    let counter = {
        let counted = counted.clone();
        tokio::spawn(async move {
            while pulls.next().await.is_some() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut sub = client.subscribe("t.reply.fast.*").await.unwrap();
    client.flush().await.unwrap();

    // One request at a time: a pull asked for one message would be one pull request per
    // request; one that asks for the room too stays open and brings the next request.
    let n = 60;
    for i in 0..n {
        let id = format!("f{i}");
        submit(
            &client,
            "fast",
            Some(&id),
            &format!("t.reply.fast.{id}"),
            "\"x\"",
        )
        .await;
        let got = replies(&mut sub, 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "request {i} unanswered");
        assert_eq!(got[0].0, "ok", "{got:?}");
    }
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = counted.load(Ordering::Relaxed);
    assert!(
        sent <= n * 3 / 4,
        "{sent} pull requests for {n} requests run one at a time"
    );
    counter.abort();
    agent.stop().await.unwrap();
}
