//! End to end through a real nats-server: what a `POST <route>` answers in each situation.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use natserve_protocol::headers;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_reaches_the_first_stage_and_its_reply_comes_back() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/inference", 1).await;
    let (_worker, mut seen) = spawn_worker(agent.client.clone(), consumer, |_, body| {
        let mut answer = Answer::ok(Bytes::from(format!(
            "{{\"echo\": {}}}",
            String::from_utf8_lossy(body)
        )));
        answer.content_type = Some("application/x-test");
        answer
    });
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let before_ms = natserve_protocol::unix_ms();
    let response = http
        .post(ingress.url("/inference"))
        .header("traceparent", traceparent)
        .body("[1, 2]")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-test");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.text().await.unwrap(), "{\"echo\": [1, 2]}");

    let work = seen.recv().await.unwrap();
    let get = |name: &str| work.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        get(headers::REQUEST_ID).as_deref(),
        Some(request_id.as_str())
    );
    assert_eq!(request_id.len(), 32, "uuid v4, simple form");
    let reply_to = get(headers::REPLY_TO).unwrap();
    assert!(reply_to.starts_with("t.reply."), "{reply_to}");
    assert!(reply_to.ends_with(&format!(".{request_id}")), "{reply_to}");
    assert_eq!(work.get("X-Route"), None, "the subject names the route");
    assert_eq!(get(headers::MSG_ID), Some(format!("{request_id}.0")));
    assert_eq!(get(headers::TRACEPARENT).as_deref(), Some(traceparent));
    let deadline: u64 = get(headers::DEADLINE).unwrap().parse().unwrap();
    assert!(deadline >= before_ms + 3000 && deadline <= natserve_protocol::unix_ms() + 3000);

    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_maps_to_its_http_status() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/inference", 1).await;
    // The body names the outcome the fake worker answers with.
    let (_worker, _seen) = spawn_worker(agent.client.clone(), consumer, |_, body| {
        let status: &'static str = match &body[..] {
            b"validation_error" => "validation_error",
            b"client_error" => "client_error",
            b"server_error" => "server_error",
            b"timeout" => "timeout",
            b"overloaded" => "overloaded",
            b"unavailable" => "unavailable",
            b"teapot" => "teapot",
            _ => "ok",
        };
        let body = if status == "ok" {
            Bytes::from_static(b"{}")
        } else {
            Bytes::from(format!("{status}: message"))
        };
        Answer {
            status,
            body,
            ..Answer::ok("")
        }
    });
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    let cases = [
        ("ok", 200),
        ("validation_error", 422),
        ("client_error", 400),
        ("server_error", 500),
        ("timeout", 504),
        ("overloaded", 429),
        ("unavailable", 503),
        ("teapot", 500),
    ];
    for (outcome, code) in cases {
        let response = http
            .post(ingress.url("/inference"))
            .body(outcome)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), code, "{outcome}");
        assert!(response.headers().contains_key("x-request-id"));
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.text().await.unwrap();
        match outcome {
            "ok" => {
                assert_eq!(content_type, "application/json");
                assert_eq!(body, "{}");
            }
            "teapot" => assert!(body.starts_with("invalid reply"), "{body}"),
            _ => {
                assert!(
                    content_type.starts_with("text/plain"),
                    "{outcome}: {content_type}"
                );
                assert_eq!(body, format!("{outcome}: message"));
            }
        }
    }
    // An empty body is forwarded like any other; the worker decides what it means.
    let response = http.post(ingress.url("/inference")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_404_and_other_methods_405() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.serve_route("/inference", 1).await;
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    let response = post_empty_json(&http, &ingress, "/nope").await;
    assert_eq!(response.status(), 404);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.text().await.unwrap(), "no route /nope");

    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let response = http
            .request(method.clone(), ingress.url("/inference"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method}");
        assert_eq!(response.headers()["allow"], "POST");
        assert!(response.headers().contains_key("x-request-id"));
    }
    // axum's own answers carry the id too.
    let response = http.post(ingress.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert!(response.headers().contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413_and_over_max_payload_a_claim_check() {
    let nats = NatsServer::start_with("max_payload: 65536", None);
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/inference", 1).await;
    let (_worker, mut seen) = spawn_worker(agent.client.clone(), consumer, |_, body| {
        Answer::ok(format!("{{\"inline\": {}}}", body.len()))
    });
    let http = http();

    let small = Ingress::start(natserve_ingress::Config {
        max_body_size: 1024,
        ..config(&nats.url)
    })
    .await;
    wait_for_route(&http, &small, "/inference").await;
    let response = http
        .post(small.url("/inference"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "exactly the limit is fine");
    let response = http
        .post(small.url("/inference"))
        .body(vec![b'x'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(
        response.headers()["connection"],
        "close",
        "the body was left unread"
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains("1024") && text.contains("--max-body-size"),
        "{text}"
    );

    // A chunked body without Content-Length is cut off while it streams in.
    let chunks = futures::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 512]))),
    );
    let response = http
        .post(small.url("/inference"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // Under --max-body-size but over what NATS takes in one message: the body goes to the
    // payloads store and the work message carries only its name.
    let big = Ingress::start(config(&nats.url)).await;
    wait_for_route(&http, &big, "/inference").await;
    while seen.try_recv().is_ok() {}
    let response = http
        .post(big.url("/inference"))
        .body(vec![b'x'; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"inline": 0}"#);
    let work = seen.recv().await.unwrap();
    let name = natserve_protocol::payloads::claim(Some(&work)).expect("a claim check");
    let js = async_nats::jetstream::new(agent.client.clone());
    let bucket = natserve_protocol::Names::new(NS).unwrap().payloads_bucket();
    let store = js.get_object_store(bucket).await.unwrap();
    let mut object = store.get(name).await.unwrap();
    let mut stored = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut stored)
        .await
        .unwrap();
    assert_eq!(stored, vec![b'x'; 100_000]);

    // Under the limit: inline, as before.
    let response = http
        .post(big.url("/inference"))
        .body(vec![b'x'; 60_000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"inline": 60000}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_first_stage_queue_is_429() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.create_stage("/inference", 0, 1).await;
    agent.put_route("/inference", 1).await;
    agent
        .heartbeat("agent-1", 60_000, &[("/inference", 0, 1)])
        .await;
    let ingress = Ingress::start(natserve_ingress::Config {
        timeout: Duration::from_millis(1500),
        ..config(&nats.url)
    })
    .await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    // Nobody pulls: the first request fills the queue and waits for its deadline.
    let first = {
        let (http, url) = (http.clone(), ingress.url("/inference"));
        tokio::spawn(async move { http.post(url).body("1").send().await.unwrap().status() })
    };
    eventually("the first request to be queued", || async {
        agent.queued("/inference", 0).await == 1
    })
    .await;
    let text = metrics(&http, &ingress).await;
    assert!(
        text.contains(r#"natserve_queue_depth{route="/inference",stage="0"} 1"#),
        "{text}"
    );

    let response = http
        .post(ingress.url("/inference"))
        .body("2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.text().await.unwrap(),
        "the queue of /inference is full, retry later"
    );
    assert_eq!(first.await.unwrap(), 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_without_a_live_agent_is_503() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.create_stage("/pipe", 0, 100).await;
    agent.create_stage("/pipe", 1, 100).await;
    agent.put_route("/pipe", 2).await;
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    wait_for_route(&http, &ingress, "/pipe").await;

    let response = post_empty_json(&http, &ingress, "/pipe").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.text().await.unwrap(),
        "no agent serves stage 0 of /pipe"
    );

    // Stage 0 served, stage 1 not yet.
    agent.heartbeat("a", 60_000, &[("/pipe", 0, 1)]).await;
    eventually("stage 1 to be reported missing", || async {
        let r = post_empty_json(&http, &ingress, "/pipe").await;
        r.status() == 503 && r.text().await.unwrap() == "no agent serves stage 1 of /pipe"
    })
    .await;

    // An agent that stops heartbeating is gone after three heartbeats (readiness needs
    // every stage, so it shows when b is seen and when b is gone).
    agent.heartbeat("b", 100, &[("/pipe", 1, 1)]).await;
    let ready = || async { http.get(ingress.url("/")).send().await.unwrap().status() == 200 };
    eventually("agent b to be seen", ready).await;
    let seen = Instant::now();
    eventually("agent b to go stale", || async { !ready().await }).await;
    let stale_after = seen.elapsed();
    assert!(stale_after < Duration::from_millis(1000), "{stale_after:?}");
    let response = post_empty_json(&http, &ingress, "/pipe").await;
    assert_eq!(
        response.text().await.unwrap(),
        "no agent serves stage 1 of /pipe"
    );

    // A clean stop deletes the record, and the stage goes at once.
    agent.heartbeat("b", 60_000, &[("/pipe", 1, 1)]).await;
    agent.delete_agent("a").await;
    eventually("stage 0 to go with its agent", || async {
        let r = post_empty_json(&http, &ingress, "/pipe").await;
        r.text().await.unwrap() == "no agent serves stage 0 of /pipe"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_by_the_deadline_is_504() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.serve_route("/inference", 1).await;
    let ingress = Ingress::start(natserve_ingress::Config {
        timeout: Duration::from_millis(300),
        ..config(&nats.url)
    })
    .await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    let started = Instant::now();
    let response = post_empty_json(&http, &ingress, "/inference").await;
    let took = started.elapsed();
    assert_eq!(response.status(), 504);
    assert_eq!(
        response.text().await.unwrap(),
        "no reply before the deadline"
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_a_stream_is_503() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.put_route("/inference", 1).await;
    agent.heartbeat("a", 60_000, &[("/inference", 0, 1)]).await;
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    let response = post_empty_json(&http, &ingress, "/inference").await;
    assert_eq!(response.status(), 503);
    let text = response.text().await.unwrap();
    assert_eq!(
        text,
        "/inference is not served: its first stage has no stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_releases_its_request() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.serve_route("/inference", 1).await;
    let ingress = Ingress::start(natserve_ingress::Config {
        timeout: Duration::from_secs(30),
        ..config(&nats.url)
    })
    .await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let result = impatient
        .post(ingress.url("/inference"))
        .body("{}")
        .send()
        .await;
    assert!(result.unwrap_err().is_timeout());
    let gave_up = Instant::now();
    eventually("the abandoned request to stop counting", || async {
        metrics(&http, &ingress)
            .await
            .contains("natserve_inflight_requests 0")
    })
    .await;
    assert!(
        gave_up.elapsed() < Duration::from_secs(2),
        "released only at the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_is_503_not_a_hang() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.serve_route("/inference", 1).await;
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    eventually("readiness", || async {
        http.get(ingress.url("/")).send().await.unwrap().status() == 200
    })
    .await;

    drop(nats);
    eventually("the outage to show on /", || async {
        let r = http.get(ingress.url("/")).send().await.unwrap();
        r.status() == 503 && r.text().await.unwrap() == "not ready: nats disconnected"
    })
    .await;
    let started = Instant::now();
    let response = post_empty_json(&http, &ingress, "/inference").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.text().await.unwrap(),
        "nats is unavailable: not connected"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    ingress.stop().await.unwrap();
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_in_and_out() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/inference", 1).await;
    // The worker sees the body as sent before compression, and answers it 100 times over.
    let (_worker, _seen) = spawn_worker(agent.client.clone(), consumer, |_, body| {
        Answer::ok(Bytes::from(String::from_utf8_lossy(body).repeat(100)))
    });
    let ingress = Ingress::start(natserve_ingress::Config {
        max_body_size: 64 * 1024,
        ..config(&nats.url)
    })
    .await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    let response = http
        .post(ingress.url("/inference"))
        .header("content-encoding", "gzip")
        .header("accept-encoding", "gzip")
        .body(gzip(b"\"abc\""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let compressed = response.bytes().await.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&compressed[..]),
        &mut text,
    )
    .unwrap();
    assert_eq!(text, "\"abc\"".repeat(100));
    assert!(compressed.len() < text.len());

    // Without Accept-Encoding the answer is plain.
    let plain = http
        .post(ingress.url("/inference"))
        .body("\"x\"")
        .send()
        .await
        .unwrap();
    assert!(!plain.headers().contains_key("content-encoding"));
    assert_eq!(plain.text().await.unwrap(), "\"x\"".repeat(100));

    // A bomb: 1 MiB of zeros compresses to about 1 KiB and is refused at the limit.
    let bomb = http
        .post(ingress.url("/inference"))
        .header("content-encoding", "gzip")
        .body(gzip(&vec![b'0'; 1 << 20]))
        .send()
        .await
        .unwrap();
    assert_eq!(bomb.status(), 413);
    // An encoding the ingress does not speak, and a body that is not what it claims.
    let unknown = http
        .post(ingress.url("/inference"))
        .header("content-encoding", "br")
        .body("xx")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 415);
    let broken = http
        .post(ingress.url("/inference"))
        .header("content-encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_request_id_is_kept_and_echoed() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/inference", 1).await;
    let (_worker, mut seen) = spawn_worker(agent.client.clone(), consumer, |_, _| Answer::ok("1"));
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    wait_for_route(&http, &ingress, "/inference").await;

    for _ in 0..2 {
        // The same id twice (a retry): both run, both are answered.
        let response = http
            .post(ingress.url("/inference"))
            .header("x-request-id", "order-42")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-request-id"], "order-42");
        let work = seen.recv().await.unwrap();
        let wire = work.get(headers::REQUEST_ID).unwrap().as_str().to_owned();
        assert!(wire.starts_with("order-42-") && wire.len() == 17, "{wire}");
    }
    for bad in ["has space", "a.b", "x".repeat(65).as_str(), "sub>ject"] {
        let response = http
            .post(ingress.url("/inference"))
            .header("x-request-id", bad)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echoed = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(echoed.len(), 32, "a fresh id for {bad:?}, got {echoed}");
        seen.recv().await.unwrap();
    }
}
