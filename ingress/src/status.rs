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
    /// `Location`: where an accepted asynchronous job's result will be.
    pub location: Option<String>,
    /// `Allow`, on a 405.
    pub allow: Option<&'static str>,
}

/// Where the result of job `id` is read.
pub fn result_location(id: &str) -> String {
    format!("/results/{id}")
}

/// A job accepted (`Prefer: respond-async`), or one still queued or running: 202 with
/// its id and where to poll. `repeated`: the job was submitted before with the same
/// `Idempotency-Key`.
pub fn accepted(id: &str, state: &str, repeated: bool) -> Answer {
    let location = result_location(id);
    let mut body = serde_json::json!({"id": id, "state": state, "location": location});
    if repeated {
        body["repeated"] = true.into();
    }
    Answer {
        status: StatusCode::ACCEPTED,
        content_type: DEFAULT_CONTENT_TYPE.to_owned(),
        body: body.to_string().into(),
        retry_after: Some(RETRY_AFTER_S),
        location: Some(location),
        allow: None,
    }
}

impl Answer {
    fn text(status: StatusCode, body: impl Into<Bytes>) -> Self {
        let retry_after = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
        .then_some(RETRY_AFTER_S);
        let allow = match status {
            StatusCode::METHOD_NOT_ALLOWED => Some("POST"),
            _ => None,
        };
        Self {
            status,
            content_type: TEXT.to_owned(),
            body: body.into(),
            retry_after,
            location: None,
            allow,
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
                RequestError::UnknownRoute(_) | RequestError::UnknownResult(_) => {
                    StatusCode::NOT_FOUND
                }
                RequestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
                RequestError::ResultMethodNotAllowed(_) => {
                    let mut a = Answer::text(StatusCode::METHOD_NOT_ALLOWED, error.to_string());
                    a.allow = Some("GET");
                    return a;
                }
                RequestError::BadIdempotencyKey
                | RequestError::IdempotencyNeedsAsync
                | RequestError::BadResultId(_)
                | RequestError::AsyncStream(_) => StatusCode::BAD_REQUEST,
                RequestError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                RequestError::BodyRead(_) => StatusCode::BAD_REQUEST,
                RequestError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
                RequestError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
                RequestError::Draining
                | RequestError::NotReady(_)
                | RequestError::NoAgent { .. }
                | RequestError::NotServed { .. }
                | RequestError::Nats(_)
                | RequestError::Results(_)
                | RequestError::PayloadStore(_) => StatusCode::SERVICE_UNAVAILABLE,
                RequestError::DeadlinePassed | RequestError::JobUnanswered(_) => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                RequestError::BadReply(_)
                | RequestError::StreamBroken(_)
                | RequestError::ReplyPayload(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
                location: None,
                allow: None,
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

/// The text of the `event: error` that ends a stream instead of `answer`'s status, in
/// Mosec's words: `SSE inference error: 422: Unprocessable Content: <message>`. Once a
/// stream's headers went out (200, as Mosec sends them at once) the status can only be
/// told this way.
pub fn error_event(answer: &Answer) -> String {
    let code = answer.status;
    // RFC 9110's name, which Mosec shows; the http crate still says "Unprocessable Entity".
    let reason = match code {
        StatusCode::UNPROCESSABLE_ENTITY => "Unprocessable Content",
        other => other.canonical_reason().unwrap_or("Error"),
    };
    format!(
        "SSE inference error: {}: {reason}: {}",
        code.as_u16(),
        String::from_utf8_lossy(&answer.body)
    )
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
    fn an_error_event_reads_as_mosec_s() {
        let bad = answer(Ok(reply(
            Outcome::ValidationError,
            None,
            "validation error: text is required",
        )));
        assert_eq!(
            error_event(&bad),
            "SSE inference error: 422: Unprocessable Content: validation error: text is required"
        );
        let late = answer(Err(RequestError::DeadlinePassed));
        assert_eq!(
            error_event(&late),
            "SSE inference error: 504: Gateway Timeout: no reply before the deadline"
        );
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
            (RequestError::BadIdempotencyKey, 400),
            (RequestError::IdempotencyNeedsAsync, 400),
            (RequestError::BadResultId("a.b".into()), 400),
            (RequestError::UnknownResult("x".into()), 404),
            (RequestError::ResultMethodNotAllowed("PUT".into()), 405),
            (RequestError::JobUnanswered("x".into()), 504),
            (RequestError::Results("down".into()), 503),
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

    #[test]
    fn a_405_names_the_method_the_path_takes() {
        let a = answer(Err(RequestError::MethodNotAllowed {
            route: "/inference".into(),
            method: "GET".into(),
        }));
        assert_eq!(a.allow, Some("POST"));
        let a = answer(Err(RequestError::ResultMethodNotAllowed("POST".into())));
        assert_eq!((a.status.as_u16(), a.allow), (405, Some("GET")));
    }

    #[test]
    fn an_accepted_job_says_where_its_result_will_be() {
        let a = accepted("abc", "pending", false);
        assert_eq!(a.status, StatusCode::ACCEPTED);
        assert_eq!(a.location.as_deref(), Some("/results/abc"));
        let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"id": "abc", "state": "pending", "location": "/results/abc"})
        );
        let again: serde_json::Value =
            serde_json::from_slice(&accepted("abc", "pending", true).body).unwrap();
        assert_eq!(again["repeated"], true);
    }
}
