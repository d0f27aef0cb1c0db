//! Durable replies through a real nats-server: a route whose queues outlive the broker
//! asks agents to record each reply in the results bucket (`X-Reply-Key`), and a request
//! whose core-NATS reply was lost is answered from there, not 504'd.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use common::*;
use futures::StreamExt;
use natserve_protocol::results::reply_key;
use natserve_protocol::{headers, JobState, Outcome, ResultRecord, Results, RouteRecord};

fn durable_route(route: &str) -> RouteRecord {
    RouteRecord {
        route: route.to_owned(),
        stages: 1,
        names: vec!["Stage0".to_owned()],
        types: None,
        streams: false,
        durable_replies: true,
        queues: Vec::new(),
    }
}

async fn next_work(consumer: &consumer::PullConsumer) -> jetstream::Message {
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    batch.next().await.expect("work arrives").unwrap()
}

/// What an agent does for a reply that must outlive the broker; the reply
/// itself is then "lost": never published.
async fn record_without_replying(results: &Results, work: &jetstream::Message, body: &[u8]) {
    let key = headers::get(work.headers.as_ref(), headers::REPLY_KEY).expect("X-Reply-Key");
    let record = ResultRecord {
        state: JobState::Done,
        route: "/inference".to_owned(),
        deadline_ms: headers::deadline_ms(work.headers.as_ref()).unwrap(),
        written_ms: natserve_protocol::unix_ms(),
        status: Some(Outcome::Ok),
        content_type: Some("application/json".to_owned()),
        batch_sizes: Some("1".to_owned()),
    };
    results
        .record_reply(key, &record, body, Duration::from_secs(30))
        .await
        .unwrap();
    work.ack().await.unwrap();
}

async fn serve_durable(agent: &Agent) -> consumer::PullConsumer {
    let consumer = agent.create_stage("/inference", 0, 1000).await;
    agent.put_route_record(durable_route("/inference")).await;
    agent
        .heartbeat("agent-1", 60_000, &[("/inference", 0, 1)])
        .await;
    consumer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_is_read_from_the_results_bucket_at_the_deadline() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = serve_durable(&agent).await;
    let results = Results::open(&agent.js, &agent.names, 1).await.unwrap();
    let ingress = Ingress::start(natserve_ingress::Config {
        timeout: Duration::from_millis(500),
        ..config(&nats.url)
    })
    .await;
    let http = reqwest::Client::new();
    wait_for_route(&http, &ingress, "/inference").await;

    let post = tokio::spawn(http.post(ingress.url("/inference")).body("{}").send());
    let work = next_work(&consumer).await;
    let id = headers::get(work.headers.as_ref(), headers::REQUEST_ID).unwrap();
    assert_eq!(
        headers::get(work.headers.as_ref(), headers::REPLY_KEY),
        Some(reply_key(id).as_str())
    );
    let ttl: u64 = headers::get(work.headers.as_ref(), headers::RESULT_TTL)
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&ttl), "{ttl}");
    record_without_replying(&results, &work, br#"{"y": 1}"#).await;

    let response = post.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"y": 1}"#);
    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_a_lost_reply_is_read_at_once() {
    let mut nats = NatsServer::start_with("", Some(free_port()));
    let agent = Agent::connect(&nats.url).await;
    let consumer = serve_durable(&agent).await;
    let results = Results::open(&agent.js, &agent.names, 1).await.unwrap();
    let timeout = Duration::from_secs(20);
    let ingress = Ingress::start(natserve_ingress::Config {
        timeout,
        ..config(&nats.url)
    })
    .await;
    let http = reqwest::Client::new();
    wait_for_route(&http, &ingress, "/inference").await;

    let post = tokio::spawn(http.post(ingress.url("/inference")).body("{}").send());
    let work = next_work(&consumer).await;
    // The agent recorded the reply, and its core-NATS message died with the broker.
    record_without_replying(&results, &work, br#"{"y": 2}"#).await;
    let restarted = Instant::now();
    nats.restart();

    let response = post.await.unwrap().unwrap();
    let took = restarted.elapsed();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"y": 2}"#);
    // Read once the ingress was back, not at the deadline.
    assert!(took < timeout / 2, "{took:?}");
    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_in_memory_asks_for_no_recorded_reply() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/inference", 1).await;
    let (_worker, mut seen) = spawn_worker(agent.client.clone(), consumer, |_, _| {
        Answer::ok(r#"{"y": 3}"#)
    });
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = reqwest::Client::new();
    wait_for_route(&http, &ingress, "/inference").await;

    let response = post_empty_json(&http, &ingress, "/inference").await;
    assert_eq!(response.status(), 200);
    let work = seen.recv().await.unwrap();
    assert!(work.get(headers::REPLY_KEY).is_none());
    assert!(work.get(headers::RESULT_TTL).is_none());
    ingress.stop().await.unwrap();
}
