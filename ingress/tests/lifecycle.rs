//! End to end through a real nats-server: readiness, metrics, start-up and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(http: &reqwest::Client, ingress: &Ingress, path: &str) -> (u16, String) {
    let response = http.get(ingress.url(path)).send().await.unwrap();
    assert!(response.headers().contains_key("x-request-id"));
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_routes_with_ready_workers_on_every_stage() {
    let nats = NatsServer::start();
    // The ingress starts first and creates the buckets; the agent finds them.
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    eventually("the ingress to listen", || async {
        http.get(ingress.url("/")).send().await.is_ok()
    })
    .await;
    assert_eq!(
        get(&http, &ingress, "/").await,
        (503, "not ready: no routes registered".into())
    );

    let agent = Agent::connect(&nats.url).await;
    agent.put_route("/pipe", 2).await;
    agent
        .heartbeat("a", 60_000, &[("/pipe", 0, 1), ("/pipe", 1, 0)])
        .await;
    eventually("stage 1 to be the reason", || async {
        get(&http, &ingress, "/").await
            == (
                503,
                "not ready: no ready worker for stage 1 of /pipe".into(),
            )
    })
    .await;

    agent.heartbeat("b", 60_000, &[("/pipe", 1, 2)]).await;
    eventually("the missing queue to be the reason", || async {
        get(&http, &ingress, "/").await
            == (
                503,
                "not ready: /pipe has no queue yet (stream t_work_pipe_0 is missing)".into(),
            )
    })
    .await;
    agent.create_stage("/pipe", 0, 100).await;
    eventually("readiness", || async {
        get(&http, &ingress, "/").await == (200, "ok".into())
    })
    .await;

    agent.delete_agent("b").await;
    eventually("readiness to drop with the agent", || async {
        get(&http, &ingress, "/").await.0 == 503
    })
    .await;
    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_that_lost_everything_heals_without_restarting_the_ingress() {
    let nats = NatsServer::start();
    let port = nats.port;
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    let agent = Agent::connect(&nats.url).await;
    agent.serve_route("/inference", 1).await;
    eventually("readiness", || async {
        http.get(ingress.url("/")).send().await.is_ok()
            && get(&http, &ingress, "/").await == (200, "ok".into())
    })
    .await;

    // Memory storage: the new server knows no stream, bucket or consumer.
    drop(agent);
    drop(nats);
    let nats = NatsServer::start_with("", Some(port));
    let names = natserve_protocol::Names::new(NS).unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    eventually("the ingress to make its buckets again", || async {
        js.get_key_value(names.routes_bucket()).await.is_ok()
            && js.get_key_value(names.agents_bucket()).await.is_ok()
    })
    .await;
    assert_eq!(get(&http, &ingress, "/").await.0, 503);

    // An agent that comes back registers into them, and the ingress sees it.
    let agent = Agent::connect(&nats.url).await;
    agent.put_route("/inference", 1).await;
    agent
        .heartbeat("agent-1", 60_000, &[("/inference", 0, 1)])
        .await;
    eventually("the missing queue to be the reason", || async {
        get(&http, &ingress, "/")
            .await
            .1
            .contains("has no queue yet")
    })
    .await;
    agent.create_stage("/inference", 0, 100).await;
    eventually("readiness again", || async {
        get(&http, &ingress, "/").await == (200, "ok".into())
    })
    .await;
    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_requests_batches_queues_and_workers() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.create_stage("/embed", 0, 100).await;
    agent.create_stage("/embed", 1, 100).await;
    agent.put_route("/embed", 2).await;
    agent
        .heartbeat("a", 60_000, &[("/embed", 0, 2), ("/embed", 1, 1)])
        .await;
    agent.heartbeat("b", 60_000, &[("/embed", 0, 3)]).await;
    // Stage 0 answers for the whole pipeline, claiming batches of 3 then 1.
    let (_worker, _seen) = spawn_worker(agent.client.clone(), consumer, |_, _| Answer {
        batch_sizes: "3,1",
        ..Answer::ok("{}")
    });
    let ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    eventually("readiness", || async {
        get(&http, &ingress, "/").await.0 == 200
    })
    .await;

    for _ in 0..2 {
        let r = post_empty_json(&http, &ingress, "/embed").await;
        assert_eq!(r.status(), 200);
    }
    http.post(ingress.url("/nowhere")).send().await.unwrap();

    let response = http.get(ingress.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for line in [
        r#"natserve_requests_total{route="/embed",status="200"} 2"#,
        r#"natserve_requests_total{route="unknown",status="404"} 1"#,
        r#"natserve_request_duration_seconds_count{route="/embed"} 2"#,
        "# HELP natserve_stage_batch_size size of the batch each request ran in, per stage",
        r#"natserve_stage_batch_size_sum{route="/embed",stage="0"} 6"#,
        r#"natserve_stage_batch_size_count{route="/embed",stage="0"} 2"#,
        r#"natserve_stage_batch_size_sum{route="/embed",stage="1"} 2"#,
        r#"natserve_queue_depth{route="/embed",stage="0"} 0"#,
        r#"natserve_queue_depth{route="/embed",stage="1"} 0"#,
        r#"natserve_stage_workers{route="/embed",stage="0"} 5"#,
        r#"natserve_stage_workers{route="/embed",stage="1"} 1"#,
        "natserve_inflight_requests 0",
        concat!(
            r#"natserve_build_info{component="ingress",version=""#,
            env!("CARGO_PKG_VERSION"),
            r#""} 1"#
        ),
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_work_and_finishes_what_is_in_flight() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/slow", 1).await;
    let (_worker, mut seen) = spawn_worker(agent.client.clone(), consumer, |_, _| Answer {
        delay: Duration::from_millis(700),
        ..Answer::ok("\"done\"")
    });
    let mut ingress = Ingress::start(config(&nats.url)).await;
    let http = http();
    eventually("readiness", || async {
        get(&http, &ingress, "/").await.0 == 200
    })
    .await;

    let in_flight = {
        let (http, url) = (http.clone(), ingress.url("/slow"));
        tokio::spawn(async move {
            let r = http.post(url).body("{}").send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    seen.recv().await.unwrap();
    ingress.begin_shutdown();
    eventually("draining to show on /", || async {
        get(&http, &ingress, "/").await == (503, "this ingress is shutting down".into())
    })
    .await;
    let refused = post_empty_json(&http, &ingress, "/slow").await;
    assert_eq!(refused.status(), 503);

    assert_eq!(in_flight.await.unwrap(), (200, "\"done\"".into()));
    let stopping = Instant::now();
    ingress.stop().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_waiting_after_the_grace_period() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    agent.serve_route("/stuck", 1).await;
    let mut ingress = Ingress::start(natserve_ingress::Config {
        timeout: Duration::from_millis(1500),
        grace: Duration::from_millis(200),
        ..config(&nats.url)
    })
    .await;
    let http = http();
    wait_for_route(&http, &ingress, "/stuck").await;

    // Nobody answers: the request lives until its deadline.
    let stuck = {
        let (http, url) = (http.clone(), ingress.url("/stuck"));
        tokio::spawn(async move { http.post(url).body("{}").send().await.unwrap().status() })
    };
    eventually("the request to be queued", || async {
        agent.queued("/stuck", 0).await == 1
    })
    .await;
    let stopping = Instant::now();
    ingress.begin_shutdown();
    // The request still ends by its deadline, and run returns soon after.
    assert_eq!(stuck.await.unwrap(), 504);
    ingress.stop().await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_waits_for_nats_to_come_up() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let ingress = Ingress::start(config(&url)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let nats = NatsServer::start_with("", Some(port));
    let http = http();
    eventually("the ingress to connect and listen", || async {
        matches!(http.get(ingress.url("/")).send().await, Ok(r) if r.status() == 503)
    })
    .await;
    drop(nats);
    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_clearly_without_nats_or_with_a_bad_namespace() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let ingress = Ingress::start(natserve_ingress::Config {
        connect_timeout: Duration::from_millis(500),
        ..config(&url)
    })
    .await;
    let err = ingress.exited().await.unwrap_err();
    assert!(
        matches!(err, natserve_ingress::Error::Connect { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&url), "{err}");

    let ingress = Ingress::start(natserve_ingress::Config {
        namespace: "a.b".into(),
        ..config(&url)
    })
    .await;
    let err = ingress.exited().await.unwrap_err();
    assert!(matches!(err, natserve_ingress::Error::Name(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_registered_before_start_are_served_from_the_first_request() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.serve_route("/inference", 1).await;
    let (_worker, _seen) = spawn_worker(agent.client.clone(), consumer, |_, _| Answer::ok("1"));
    let ingress = Ingress::start(config(&nats.url)).await;
    // No waiting: start-up loads the registrations before it serves.
    let response = http()
        .post(ingress.url("/inference"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    ingress.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_first_ingress_refuses_connections_until_every_stage_has_a_ready_worker() {
    let nats = NatsServer::start();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = socket.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(natserve_ingress::run(
        natserve_ingress::Listener::WhenReady(socket),
        config(&nats.url),
        async move {
            let _ = stopped.await;
        },
    ));
    let agent = Agent::connect(&nats.url).await;
    agent.put_route("/x", 1).await;
    agent.create_stage("/x", 0, 1000).await;
    // A route with no ready worker: the port is taken but nobody listens on it.
    agent.heartbeat("a", 60_000, &[("/x", 0, 0)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = tokio::net::TcpStream::connect(address).await;
    assert!(refused.is_err(), "connected before ready");

    agent.heartbeat("a", 60_000, &[("/x", 0, 1)]).await;
    let http = http();
    let url = format!("http://{address}/");
    eventually("the ingress to listen once ready", || async {
        http.get(&url).send().await.is_ok()
    })
    .await;
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_first_ingress_stopped_before_it_was_ready_exits_cleanly() {
    let nats = NatsServer::start();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let started = Instant::now();
    natserve_ingress::run(
        natserve_ingress::Listener::WhenReady(socket),
        config(&nats.url),
        tokio::time::sleep(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
}
