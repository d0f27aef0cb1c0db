//! The HTTP edge against clients that misbehave on purpose: headers dribbled a byte at a
//! time (slowloris), connections that say nothing (also while the ingress stops), more
//! connections than the cap, and HTTP/2 with prior knowledge.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn host_port(ingress: &Ingress) -> String {
    ingress.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection; what it sent, or `None` if it kept the
/// connection open for `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok().map(|()| got)
}

async fn started(header_read_timeout: Duration, max_connections: usize) -> (NatsServer, Ingress) {
    let nats = NatsServer::start();
    let ingress = listening(natserve_ingress::Config {
        header_read_timeout,
        max_connections,
        ..config(&nats.url)
    })
    .await;
    (nats, ingress)
}

/// An ingress on `config`, once it answers HTTP.
async fn listening(config: natserve_ingress::Config) -> Ingress {
    let ingress = Ingress::start(config).await;
    let http = reqwest::Client::new();
    eventually("the ingress to listen", || async {
        http.get(ingress.url("/")).send().await.is_ok()
    })
    .await;
    ingress
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dribbling_its_headers_is_closed_at_the_header_timeout() {
    let timeout = Duration::from_millis(600);
    let (_nats, ingress) = started(timeout, 100).await;
    let mut loris = TcpStream::connect(host_port(&ingress)).await.unwrap();
    let opened = Instant::now();
    // One byte every 100 ms: always something new, never a whole header block.
    let dribble = async {
        for byte in b"POST /inference HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if loris.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), dribble).await;
    let closed_after = opened.elapsed();
    assert!(
        closed_after < Duration::from_secs(5),
        "still open after {closed_after:?}"
    );
    let got = read_until_closed(&mut loris, Duration::from_secs(2)).await;
    let got = got.expect("the connection is closed");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_says_nothing_is_closed() {
    let (_nats, ingress) = started(Duration::from_millis(500), 100).await;
    let mut silent = TcpStream::connect(host_port(&ingress)).await.unwrap();
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(5))
            .await
            .is_some(),
        "a silent connection stays open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_closes_connections_that_have_said_nothing_yet() {
    // An HTTP client's pool can open a connection it never uses. The stop must not wait
    // for its header timeout (here a minute), nor for the backstop after the request
    // timeout (here 10 s + a little).
    let nats = NatsServer::start();
    let ingress = listening(natserve_ingress::Config {
        header_read_timeout: Duration::from_secs(60),
        timeout: Duration::from_secs(10),
        ..config(&nats.url)
    })
    .await;
    let mut silent = TcpStream::connect(host_port(&ingress)).await.unwrap();
    // Accepted: a request on a connection opened after it is answered.
    let fresh = reqwest::Client::new();
    assert!(fresh.get(ingress.url("/")).send().await.is_ok());

    let stopping = Instant::now();
    ingress.stop().await.unwrap();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(2))
            .await
            .is_some(),
        "the silent connection is still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let (_nats, ingress) = started(Duration::from_secs(30), 2).await;
    let addr = host_port(&ingress);
    let mut first = TcpStream::connect(&addr).await.unwrap();
    let mut second = TcpStream::connect(&addr).await.unwrap();
    // Both slots held by idle connections: a third is accepted by the kernel but not served.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_until_closed(&mut third, Duration::from_millis(700)).await,
        None,
        "served past the cap"
    );
    first.shutdown().await.unwrap();
    drop(first);
    let answer = read_until_closed(&mut third, Duration::from_secs(5))
        .await
        .expect("served once a slot is free");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_http2_with_prior_knowledge() {
    let (_nats, ingress) = started(Duration::from_secs(30), 100).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2.get(ingress.url("/")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("x-request-id"));
    let h1 = reqwest::Client::new();
    let response = h1.get(ingress.url("/")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
}
