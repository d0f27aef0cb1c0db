//! The floor under natserve's hops: a bare JetStream publish -> pull -> reply -> ack round
//! trip, with the async-nats calls the ingress and the scheduler make, and nothing else
//! (no HTTP, no worker process). `make bench` prints it beside each workload.
//!
//!     cargo run --release -p natserve-scheduler --example floor -- \
//!         --nats nats://127.0.0.1:4222 --concurrency 32 --duration-s 10
//!
//! `concurrency` requesters each publish one message (awaiting the publish ack), and wait
//! for its reply on a shared wildcard subscription; one puller fetches up to that many
//! messages at a time, replies to each over core NATS and acks it. Every reply is checked
//! against what was sent. Prints one line: `BENCH_JSON {...}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;

const STREAM: &str = "floor_work";
const SUBJECT: &str = "floor.work";
const REPLY_PREFIX: &str = "floor.reply";

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Bytes>>>>;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let url = arg("--nats", "nats://127.0.0.1:4222");
    let concurrency: usize = arg("--concurrency", "1").parse()?;
    let duration = Duration::from_secs_f64(arg("--duration-s", "10").parse()?);
    let warmup = Duration::from_secs_f64(arg("--warmup-s", "2").parse()?);

    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("workers".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;

    tokio::spawn(serve(consumer, client.clone(), concurrency));
    let waiting: Waiting = Arc::default();
    let mut replies = client.subscribe(format!("{REPLY_PREFIX}.*")).await?;
    let dispatch = waiting.clone();
    tokio::spawn(async move {
        while let Some(msg) = replies.next().await {
            let id = msg
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            if let Some(tx) = dispatch.lock().unwrap().remove(&id) {
                let _ = tx.send(msg.payload);
            }
        }
    });

    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (js, waiting) = (js.clone(), waiting.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let id = format!("{t}-{n}");
                let body = Bytes::from(format!("{{\"x\": {n}, \"y\": {}}}", 2 * n + 1));
                let (tx, rx) = oneshot::channel();
                waiting.lock().unwrap().insert(id.clone(), tx);
                let mut h = HeaderMap::new();
                h.insert("X-Reply-To", format!("{REPLY_PREFIX}.{id}").as_str());
                let sent = Instant::now();
                let ok = match js.publish_with_headers(SUBJECT, h, body.clone()).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                } && matches!(
                    tokio::time::timeout(Duration::from_secs(3), rx).await,
                    Ok(Ok(reply)) if reply == body
                );
                if sent >= measure_from && Instant::now() <= end {
                    if ok {
                        latencies.push(sent.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)));
    println!(
        "BENCH_JSON {{\"requests\": {}, \"duration_us\": {}, \"p50_us\": {}, \"p99_us\": {}, \
         \"max_us\": {}, \"non_2xx\": {errors}, \"bad_body\": 0, \"socket_errors\": 0}}",
        all.len(),
        duration.as_micros(),
        pct(0.50).copied().unwrap_or(0),
        pct(0.99).copied().unwrap_or(0),
        all.last().copied().unwrap_or(0),
    );
    let _ = js.delete_stream(STREAM).await;
    Ok(())
}

/// The scheduler's side: pull what there is (up to `max`), answer each, ack each.
async fn serve(
    consumer: jetstream::consumer::PullConsumer,
    client: async_nats::Client,
    max: usize,
) {
    loop {
        let batch = consumer
            .batch()
            .max_messages(max)
            .expires(Duration::from_millis(500))
            .messages()
            .await;
        let Ok(mut batch) = batch else { continue };
        while let Some(Ok(msg)) = batch.next().await {
            let client = client.clone();
            tokio::spawn(async move {
                let to = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("X-Reply-To"))
                    .map(|v| v.as_str().to_owned());
                if let Some(to) = to {
                    let _ = client.publish(to, msg.payload.clone()).await;
                }
                let _ = msg.ack().await;
            });
        }
    }
}
