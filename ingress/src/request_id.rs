//! The request id: a caller's `X-Request-Id` kept when it is a sane token (else a fresh
//! one), carried on the wire with a random suffix, echoed on the response, and opened as
//! the span every log line about the request is written in.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use natserve_protocol::headers as wire;
use tracing::{info, info_span, Instrument};

/// Name of the response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id assigned on arrival, for handlers to read.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Longest caller `X-Request-Id` kept.
pub const MAX_CALLER_ID: usize = 64;

/// A caller's `X-Request-Id` natserve can carry: a token of letters, digits, `_` and `-`
/// (it becomes part of NATS subjects and de-duplication ids, where `.`, `*` and `>` mean
/// something).
fn sane_caller_id(value: &HeaderValue) -> Option<&str> {
    let id = value.to_str().ok()?;
    let sane = !id.is_empty()
        && id.len() <= MAX_CALLER_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    sane.then_some(id)
}

/// The request's id on the wire, and the one the response echoes. A caller's sane
/// `X-Request-Id` is kept and echoed; on the wire it gets a random suffix, because a
/// client retrying with the same id must not be de-duplicated by JetStream or share a
/// reply subject with its first try. Every log line then still carries the caller's id.
/// The third is a caller's id that was not usable, for the log.
fn request_ids(caller: Option<&HeaderValue>) -> (String, String, Option<&HeaderValue>) {
    let fresh = uuid::Uuid::new_v4().simple().to_string();
    match caller.map(|v| (v, sane_caller_id(v))) {
        Some((_, Some(id))) => (format!("{id}-{}", &fresh[..8]), id.to_owned(), None),
        Some((given, None)) => (fresh.clone(), fresh, Some(given)),
        None => (fresh.clone(), fresh, None),
    }
}

/// Assigns the request id, runs the request inside its span (`request_id`, and the
/// `trace_id` of a `traceparent` that came in), and stamps the id on the response,
/// whichever handler (or axum itself) produced it.
pub async fn with_request_id(mut request: Request, next: Next) -> Response {
    let (id, echoed, refused) = request_ids(request.headers().get(REQUEST_ID_HEADER));
    let refused = refused.cloned();
    let trace_id = request
        .headers()
        .get(wire::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(wire::trace_id);
    let span = info_span!(
        "request",
        request_id = %id,
        trace_id = tracing::field::Empty,
        method = %request.method(),
        path = %request.uri().path(),
    );
    if let Some(trace_id) = trace_id {
        span.record("trace_id", trace_id);
    }
    if let Some(given) = refused {
        span.in_scope(|| info!(given = ?given, "caller's x-request-id is not a usable token; using a fresh one"));
    }
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&echoed) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
