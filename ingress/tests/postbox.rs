//! Group commit of work publishes through a real nats-server: requests for one stage that
//! wait together go as one envelope, a request alone goes as a message of its own, and a
//! refusal reaches every request of its group.

mod common;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use natserve_ingress::postbox::Postbox;
use natserve_protocol::{envelope, headers, Names, Rejection};

fn work(id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::REQUEST_ID, id);
    h
}

#[tokio::test]
async fn requests_that_wait_together_go_as_one_envelope() {
    let nats = NatsServer::start();
    let agent = Agent::connect(&nats.url).await;
    let consumer = agent.create_stage("/box", 0, 1000).await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let postbox = Postbox::new(client.clone(), async_nats::jetstream::new(client));
    let subject = Names::new(NS).unwrap().work_subject("box", 0);

    // Alone: a message of its own, as any NATS client would send it.
    postbox
        .publish(&subject, work("solo"), Bytes::from_static(b"1"))
        .await
        .unwrap();
    // Twenty at once: on this single-threaded runtime all are queued before the
    // publisher runs, so they make one group.
    let posts = (0..20).map(|i| {
        let id = format!("r{i}");
        let postbox = &postbox;
        let subject = &subject;
        async move {
            postbox
                .publish(subject, work(&id), Bytes::from(id.clone()))
                .await
        }
    });
    for result in futures::future::join_all(posts).await {
        result.unwrap();
    }
    assert_eq!(agent.queued("/box", 0).await, 2);

    let mut batch = consumer.fetch().max_messages(2).messages().await.unwrap();
    let solo = futures::StreamExt::next(&mut batch).await.unwrap().unwrap();
    assert_eq!(
        headers::get(solo.headers.as_ref(), headers::REQUEST_ID),
        Some("solo")
    );
    assert!(headers::get(solo.headers.as_ref(), headers::ENVELOPE).is_none());
    let group = futures::StreamExt::next(&mut batch).await.unwrap().unwrap();
    assert_eq!(
        headers::get(group.headers.as_ref(), headers::ENVELOPE),
        Some("20")
    );
    let letters = envelope::decode(&group.payload).unwrap();
    let ids: Vec<&str> = letters
        .iter()
        .map(|l| l.header(headers::REQUEST_ID).unwrap())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, want);
    assert_eq!(letters[3].body.as_ref(), b"r3");
}

#[tokio::test]
async fn a_refusal_reaches_every_request_of_its_group() {
    let nats = NatsServer::start();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let postbox = Postbox::new(client.clone(), async_nats::jetstream::new(client));
    let subject = Names::new(NS).unwrap().work_subject("nowhere", 0);
    let posts = (0..5).map(|i| {
        let postbox = &postbox;
        let subject = &subject;
        async move {
            postbox
                .publish(subject, work(&format!("n{i}")), Bytes::new())
                .await
        }
    });
    for result in futures::future::join_all(posts).await {
        assert_eq!(result.unwrap_err().rejection, Rejection::NoStream);
    }
}
