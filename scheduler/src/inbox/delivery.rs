//! What a message on a pull inbox means for the pull request in flight: work, the end
//! of the request, or nothing for it.

use async_nats::StatusCode;

/// What one message on the inbox means for the pull request in flight.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A work message: hand it on.
    Work,
    /// The request in flight is over (no messages now, expired, or ended by the server).
    Done,
    /// Nothing for us: a heartbeat, or a status ending an earlier request.
    Ignore,
    /// The request in flight failed.
    Failed,
}

/// Classifies `msg` for the request whose reply subject is `current`.
pub fn classify(msg: &async_nats::Message, current: &str) -> Delivery {
    match msg.status {
        None | Some(StatusCode::OK) => Delivery::Work,
        Some(StatusCode::IDLE_HEARTBEAT) => Delivery::Ignore,
        Some(_) if msg.subject.as_str() != current => Delivery::Ignore,
        Some(StatusCode::NOT_FOUND | StatusCode::TIMEOUT) => Delivery::Done,
        // 409 (consumer deleted, too many waiting pulls, ...), 503 (no consumer): an error
        // the stage reports and backs off from, rather than a pull to repeat at once.
        Some(_) => Delivery::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(subject: &str, status: Option<StatusCode>) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: Bytes::new(),
            headers: None,
            status,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn work_arrives_on_its_stream_subject() {
        let msg = message("ns.work.inference.0", None);
        assert_eq!(classify(&msg, "_INBOX.a.7"), Delivery::Work);
    }

    #[test]
    fn a_status_ends_only_its_own_request() {
        for status in [StatusCode::NOT_FOUND, StatusCode::TIMEOUT] {
            assert_eq!(
                classify(&message("_INBOX.a.7", Some(status)), "_INBOX.a.7"),
                Delivery::Done
            );
            // A late status of request 6 must not end request 7.
            assert_eq!(
                classify(&message("_INBOX.a.6", Some(status)), "_INBOX.a.7"),
                Delivery::Ignore
            );
        }
    }

    #[test]
    fn heartbeats_are_ignored_and_other_statuses_fail() {
        let beat = message("_INBOX.a.7", Some(StatusCode::IDLE_HEARTBEAT));
        assert_eq!(classify(&beat, "_INBOX.a.7"), Delivery::Ignore);
        for status in [StatusCode::NO_RESPONDERS, StatusCode::REQUEST_TERMINATED] {
            let bad = message("_INBOX.a.7", Some(status));
            assert_eq!(classify(&bad, "_INBOX.a.7"), Delivery::Failed);
        }
    }
}
