//! The one place where a request's result becomes an HTTP status and body.
//!
//! The protocol's outcomes are not HTTP statuses: workers and agents speak [`Outcome`],
//! and only [`answer`] turns an outcome or a [`RequestError`] into HTTP.

use axum::http::StatusCode;
use bytes::Bytes;
use natserve_protocol::Outcome;

use crate::error::RequestError;
use crate::submit::Reply;

/// Media type of a successful reply that did not name one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";
/// Media type of every error body, ours or a worker's.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Seconds a client is told to wait (`Retry-After`) before retrying a 429 or a 503: both
/// are conditions that clear by themselves (a queue draining, an agent coming up).
pub const RETRY_AFTER_S: u32 = 1;

/// What the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u32>,
}

impl Answer {
    fn text(status: StatusCode, body: impl Into<Bytes>) -> Self {
        let retry_after = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
        .then_some(RETRY_AFTER_S);
        Self {
            status,
            content_type: TEXT.to_owned(),
            body: body.into(),
            retry_after,
        }
    }
}

/// Maps every reply outcome and every request error to the HTTP answer.
///
/// The body of a non-ok reply is the worker's one-line message, passed through as text.
pub fn answer(result: Result<Reply, RequestError>) -> Answer {
    let reply = match result {
        Ok(reply) => reply,
        Err(error) => {
            let status = match &error {
                RequestError::UnknownRoute(_) => StatusCode::NOT_FOUND,
                RequestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
                RequestError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                RequestError::BodyRead(_) => StatusCode::BAD_REQUEST,
                RequestError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
                RequestError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
                RequestError::Draining
                | RequestError::NotReady(_)
                | RequestError::NoAgent { .. }
                | RequestError::NotServed { .. }
                | RequestError::Nats(_)
                | RequestError::PayloadStore(_) => StatusCode::SERVICE_UNAVAILABLE,
                RequestError::DeadlinePassed => StatusCode::GATEWAY_TIMEOUT,
                RequestError::BadReply(_) | RequestError::ReplyPayload(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            return Answer::text(status, error.to_string());
        }
    };
    let status = match reply.outcome {
        Outcome::Ok => {
            return Answer {
                status: StatusCode::OK,
                content_type: reply
                    .content_type
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned()),
                body: reply.body,
                retry_after: None,
            }
        }
        Outcome::ValidationError => StatusCode::UNPROCESSABLE_ENTITY,
        Outcome::ClientError => StatusCode::BAD_REQUEST,
        Outcome::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
        Outcome::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Outcome::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        Outcome::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    Answer::text(status, reply.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(outcome: Outcome, content_type: Option<&str>, body: &'static str) -> Reply {
        Reply {
            outcome,
            content_type: content_type.map(str::to_owned),
            body: Bytes::from_static(body.as_bytes()),
            batch_sizes: None,
        }
    }

    #[test]
    fn every_outcome_has_its_status() {
        let table = [
            (Outcome::Ok, 200),
            (Outcome::ValidationError, 422),
            (Outcome::ClientError, 400),
            (Outcome::ServerError, 500),
            (Outcome::Timeout, 504),
            (Outcome::Overloaded, 429),
            (Outcome::Unavailable, 503),
        ];
        assert_eq!(
            table.len(),
            Outcome::ALL.len(),
            "a new outcome needs a status"
        );
        for (outcome, code) in table {
            let a = answer(Ok(reply(outcome, None, "x")));
            assert_eq!(a.status.as_u16(), code, "{outcome}");
            assert_eq!(a.body, "x", "{outcome} body passes through");
            let want = if outcome == Outcome::Ok {
                DEFAULT_CONTENT_TYPE
            } else {
                TEXT
            };
            assert_eq!(a.content_type, want, "{outcome}");
            assert_eq!(
                a.retry_after.is_some(),
                code == 429 || code == 503,
                "{outcome}: Retry-After on 429 and 503 only"
            );
        }
    }

    #[test]
    fn ok_keeps_the_reply_content_type_and_errors_are_text() {
        let a = answer(Ok(reply(Outcome::Ok, Some("image/png"), "png")));
        assert_eq!(a.content_type, "image/png");
        let a = answer(Ok(reply(
            Outcome::ValidationError,
            Some("application/json"),
            "validation error: bad",
        )));
        assert_eq!(a.content_type, TEXT);
        assert_eq!(a.body, "validation error: bad");
    }

    #[test]
    fn every_request_error_has_its_status() {
        let r = || "/inference".to_owned();
        let table = [
            (RequestError::UnknownRoute(r()), 404),
            (
                RequestError::MethodNotAllowed {
                    route: r(),
                    method: "GET".into(),
                },
                405,
            ),
            (
                RequestError::BodyTooLarge {
                    limit: 10,
                    why: "--max-body-size",
                },
                413,
            ),
            (RequestError::BodyRead("reset".into()), 400),
            (RequestError::BodyTimeout, 408),
            (RequestError::Draining, 503),
            (RequestError::NotReady("no routes registered".into()), 503),
            (
                RequestError::NoAgent {
                    route: r(),
                    stage: 1,
                },
                503,
            ),
            (RequestError::QueueFull { route: r() }, 429),
            (RequestError::NotServed { route: r() }, 503),
            (RequestError::Nats("disconnected".into()), 503),
            (RequestError::DeadlinePassed, 504),
            (RequestError::BadReply("no X-Status".into()), 500),
            (RequestError::PayloadStore("store full".into()), 503),
            (RequestError::ReplyPayload("object gone".into()), 500),
        ];
        for (error, code) in table {
            let message = error.to_string();
            let a = answer(Err(error));
            assert_eq!(a.status.as_u16(), code, "{message}");
            assert_eq!(a.body, message);
            assert_eq!(a.content_type, TEXT);
            let retry = code == 429 || code == 503;
            assert_eq!(a.retry_after, retry.then_some(RETRY_AFTER_S), "{message}");
        }
    }

    #[test]
    fn messages_name_what_went_wrong() {
        let a = answer(Err(RequestError::NoAgent {
            route: "/inference".into(),
            stage: 1,
        }));
        assert_eq!(a.body, "no agent serves stage 1 of /inference");
        let a = answer(Err(RequestError::UnknownRoute("/nope".into())));
        assert_eq!(a.body, "no route /nope");
    }
}
