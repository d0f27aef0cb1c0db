//! HTTP handlers: `POST <route>` into the pipeline (or, with `Prefer: respond-async`,
//! queued as an asynchronous job), `GET /results/<id>`, `GET /` readiness, `GET /metrics`.
//!
//! Every response carries `x-request-id`, stamped by [`with_request_id`], which also opens
//! the request's span. Results go through [`crate::status::answer`] and nowhere else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Extension, Router};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use natserve_protocol::records::{idempotent_result_id, is_result_id, MAX_IDEMPOTENCY_KEY};
use natserve_protocol::{headers as wire, route_slug, Names, Outcome, Results, RouteRecord};
use tokio::time::Instant;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tracing::{debug, error, warn, Instrument};

use crate::config::Config;
use crate::drain::Drain;
use crate::error::RequestError;
use crate::metrics::{Metrics, UNKNOWN_ROUTE};
use crate::openapi;
use crate::request_id::{with_request_id, RequestId};
use crate::routes::SharedRoutes;
use crate::status::{accepted, answer, error_event, Answer};
use crate::stream::{ReplyStream, StreamItem};
use crate::submit::{Accepted, AsyncJob, Reply, Submission, Submitter};

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `route` label of `GET /results/<id>` in the request metrics.
pub const RESULTS_LABEL: &str = "/results";
/// The request header that makes a retried asynchronous submit find its first job.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// How long past its deadline a job may stay pending before a read calls it unanswered:
/// an agent answers expired work as soon as it pulls it, and replaces a worker that hangs
/// one second past the latest deadline in its batch, so only a job no agent holds is
/// pending this late.
pub const PENDING_GRACE_MS: u64 = 5_000;
/// How often a quiet stream gets an SSE comment, so proxies keep it open (Mosec's 3 s).
const KEEP_ALIVE: Duration = Duration::from_secs(3);

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub names: Names,
    pub routes: SharedRoutes,
    pub submitter: Submitter,
    /// The results bucket of asynchronous jobs. `None` only where no NATS server exists
    /// to open it (the HTTP fuzz target): asynchronous submits and reads then answer 503.
    pub results: Option<Results>,
    pub metrics: Metrics,
    pub drain: Drain,
}

/// The ingress's HTTP surface.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(readiness))
        .route("/metrics", get(metrics))
        .route(openapi::METADATA_PATH, get(openapi_document))
        .route(openapi::SWAGGER_PATH, get(swagger))
        .route("/results/{id}", any(read_result))
        .fallback(serve_route)
        // gzip or zstd request bodies are decompressed before the size limit applies (a
        // small compressed bomb is still refused at the limit, 413); an unknown
        // Content-Encoding is 415. Responses are compressed when the client asks.
        .layer(RequestDecompressionLayer::new().gzip(true).zstd(true))
        .layer(CompressionLayer::new().gzip(true).zstd(true))
        .layer(middleware::from_fn(with_request_id))
        .with_state(app)
}

async fn readiness(State(app): State<Arc<App>>) -> Response {
    let result = app.ready().await;
    match result {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, crate::status::TEXT)],
            "ok",
        )
            .into_response(),
        Err(e) => into_response(answer(Err(e))),
    }
}

async fn openapi_document(State(app): State<Arc<App>>) -> Response {
    let routes = app
        .routes
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .routes(std::time::Instant::now());
    axum::Json(openapi::document(&routes)).into_response()
}

async fn swagger() -> Response {
    axum::response::Html(openapi::swagger_page()).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.metrics
        .refresh(&app.routes, app.submitter.jetstream(), &app.names)
        .await;
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        app.metrics.render(),
    )
        .into_response()
}

async fn serve_route(
    State(app): State<Arc<App>>,
    Extension(RequestId(id)): Extension<RequestId>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let path = uri.path();
    let mut body = Some(body);
    let record = app
        .routes
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .lookup(path, std::time::Instant::now())
        .cloned();
    let (label, result) = match record {
        None => (
            UNKNOWN_ROUTE.to_owned(),
            Err(RequestError::UnknownRoute(path.to_owned())),
        ),
        Some(record) => {
            let result = app
                .forward(&record, &id, method, &headers, &mut body, started)
                .await;
            (record.route, result)
        }
    };
    // A body left (partly) unread makes hyper close the connection after the answer; say
    // so, or the client may reuse the connection and lose its next request.
    let unread = match &result {
        Err(
            RequestError::BodyTooLarge { .. }
            | RequestError::BodyTimeout
            | RequestError::BodyRead(_),
        ) => true,
        _ => body.is_some() && declares_body(&headers),
    };
    let batch_sizes = match &result {
        Ok(Routed::Replied(r)) => r.batch_sizes.clone(),
        _ => None,
    };
    let answer = match result {
        Ok(Routed::Streamed(stream)) => {
            app.metrics
                .observe(&label, StatusCode::OK, started.elapsed(), None);
            return sse_response(stream);
        }
        Ok(Routed::Accepted(Accepted { id, repeated })) => accepted(&id, "pending", repeated),
        Ok(Routed::Replied(reply)) => answer(Ok(reply)),
        Err(e) => answer(Err(e)),
    };
    app.metrics.observe(
        &label,
        answer.status,
        started.elapsed(),
        batch_sizes.as_deref(),
    );
    log_answer(&answer);
    let mut response = into_response(answer);
    if unread {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// What a request to a route came to: the pipeline's reply, a job accepted, or (a
/// streaming route) a stream of events ended by the reply.
#[derive(Debug)]
pub enum Routed {
    Replied(Reply),
    Accepted(Accepted),
    Streamed(ReplyStream),
}

/// `GET /results/<id>`: a finished job's answer as the pipeline gave it, 202 while it is
/// queued or running, 404 for an id the bucket does not hold.
async fn read_result(
    State(app): State<Arc<App>>,
    method: Method,
    Path(id): Path<String>,
) -> Response {
    let started = Instant::now();
    let answer = app
        .read_result(&method, &id)
        .await
        .unwrap_or_else(|e| answer(Err(e)));
    app.metrics
        .observe(RESULTS_LABEL, answer.status, started.elapsed(), None);
    log_answer(&answer);
    into_response(answer)
}

/// Whether the client asked for an asynchronous answer (`Prefer: respond-async`, RFC 7240),
/// among any other preferences.
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|pref| {
            let name = pref.split([';', '=']).next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("respond-async")
        })
}

/// The caller's `Idempotency-Key`, if any: 1 to [`MAX_IDEMPOTENCY_KEY`] visible ASCII
/// characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, RequestError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| RequestError::BadIdempotencyKey)?;
    let sane = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY
        && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    sane.then_some(Some(key))
        .ok_or(RequestError::BadIdempotencyKey)
}

fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v != "0")
}

impl App {
    /// Every route's first stage has its stream: a NATS server that kept its store in
    /// memory comes back without them, and until an agent makes them again a request could
    /// only be refused.
    /// Whether `GET /` answers 200: not draining, connected, every stage of every route
    /// has a ready worker on a live agent, and every route's first queue exists.
    pub async fn ready(&self) -> Result<(), RequestError> {
        if self.drain.is_draining() {
            return Err(RequestError::Draining);
        }
        if !self.submitter.is_connected() {
            return Err(RequestError::NotReady("nats disconnected".to_owned()));
        }
        let first_streams = {
            let table = self.routes.read().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            table.readiness(now).map(|()| {
                table
                    .routes(now)
                    .into_iter()
                    .filter_map(|(_, r)| {
                        let stream = self.names.stream_at(&r.queue(0)).ok()?;
                        Some((r.route, stream))
                    })
                    .collect::<Vec<_>>()
            })
        };
        match first_streams {
            Err(reason) => Err(RequestError::NotReady(reason)),
            Ok(streams) => self.queues_exist(streams).await,
        }
    }

    async fn queues_exist(&self, first_streams: Vec<(String, String)>) -> Result<(), RequestError> {
        // One STREAM.INFO per route (what the least-privilege ingress user may ask), not a
        // listing of every stream on the server.
        let js = self.submitter.jetstream();
        let checks = first_streams
            .iter()
            .map(|(_, stream)| js.get_stream(stream));
        for ((route, stream), found) in first_streams
            .iter()
            .zip(futures::future::join_all(checks).await)
        {
            match found {
                Ok(_) => {}
                Err(e) if natserve_protocol::streams::is_missing(&e) => {
                    return Err(RequestError::NotReady(format!(
                        "{route} has no queue yet (stream {stream} is missing)"
                    )))
                }
                Err(e) => {
                    return Err(RequestError::NotReady(format!(
                        "cannot ask nats about {stream}: {e}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Takes one request for a known route through the pipeline.
    async fn forward(
        &self,
        record: &RouteRecord,
        request_id: &str,
        method: Method,
        headers: &HeaderMap,
        body: &mut Option<Body>,
        started: Instant,
    ) -> Result<Routed, RequestError> {
        if method != Method::POST {
            return Err(RequestError::MethodNotAllowed {
                route: record.route.clone(),
                method: method.to_string(),
            });
        }
        if self.drain.is_draining() {
            return Err(RequestError::Draining);
        }
        let _inflight = self.drain.enter();
        let unserved = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .first_unserved_stage(record, std::time::Instant::now());
        if let Some(stage) = unserved {
            return Err(RequestError::NoAgent {
                route: record.route.clone(),
                stage,
            });
        }
        let slug = route_slug(&record.route)
            .map_err(|_| RequestError::UnknownRoute(record.route.clone()))?;
        let asynchronous = prefers_async(headers);
        let idempotency = idempotency_key(headers)?;
        if idempotency.is_some() && !asynchronous {
            return Err(RequestError::IdempotencyNeedsAsync);
        }
        if asynchronous && record.streams {
            return Err(RequestError::AsyncStream(record.route.clone()));
        }
        // An asynchronous job has its own, longer deadline on the wire; reading its body
        // and queueing it are still bounded by the request timeout.
        let deadline = started + self.config.timeout;
        let lifetime = if asynchronous {
            self.config.async_timeout
        } else {
            self.config.timeout
        };
        let deadline_ms = natserve_protocol::unix_ms() + lifetime.as_millis() as u64;

        // A body over one NATS message goes through the payloads store (`crate::submit`),
        // so only --max-body-size bounds it.
        let (limit, why) = (self.config.max_body_size, "--max-body-size");
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(RequestError::BodyTooLarge { limit, why });
        }
        let body = match body.take() {
            Some(body) => read_body(body, limit, why, deadline).await?,
            None => Bytes::new(),
        };

        let traceparent = headers.get(wire::TRACEPARENT).and_then(|v| v.to_str().ok());
        let submission = Submission {
            route: &record.route,
            slug: &slug,
            request_id,
            body,
            traceparent,
            deadline,
            deadline_ms,
            durable: self
                .results
                .as_ref()
                .filter(|_| record.durable_replies && !record.streams && !asynchronous),
        };
        if record.streams {
            return self
                .submitter
                .submit_stream(submission)
                .await
                .map(Routed::Streamed);
        }
        if !asynchronous {
            return self.submitter.submit(submission).await.map(Routed::Replied);
        }
        let id = match idempotency {
            Some(key) => idempotent_result_id(&record.route, key),
            None => request_id.to_owned(),
        };
        let job = AsyncJob {
            results: self.results()?,
            id: &id,
            idempotent: idempotency.is_some(),
            ttl: self.config.result_ttl,
        };
        let accepted = self.submitter.submit_async(submission, job).await?;
        debug!(result_id = %accepted.id, repeated = accepted.repeated, "job accepted");
        Ok(Routed::Accepted(accepted))
    }

    fn results(&self) -> Result<&Results, RequestError> {
        self.results
            .as_ref()
            .ok_or_else(|| RequestError::Results("not opened".into()))
    }

    /// The answer to `GET /results/<id>`.
    async fn read_result(&self, method: &Method, id: &str) -> Result<Answer, RequestError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(RequestError::ResultMethodNotAllowed(method.to_string()));
        }
        if !is_result_id(id) {
            return Err(RequestError::BadResultId(id.to_owned()));
        }
        let found = self.results()?.read(id).await.map_err(|e| match e {
            natserve_protocol::results::ResultsError::Record(bad) => {
                RequestError::BadReply(bad.to_string())
            }
            other => RequestError::Results(other.to_string()),
        })?;
        let (record, body) = found.ok_or_else(|| RequestError::UnknownResult(id.to_owned()))?;
        let deadline_ms = record.deadline_ms;
        match Reply::from_record(record, body) {
            Some(reply) => Ok(answer(Ok(reply))),
            None if natserve_protocol::unix_ms() > deadline_ms + PENDING_GRACE_MS => {
                Err(RequestError::JobUnanswered(id.to_owned()))
            }
            None => Ok(accepted(id, "pending", false)),
        }
    }
}

/// Reads the whole body, refusing it as soon as it passes `limit` and giving up at the
/// deadline, so a slow or endless upload cannot hold the request open.
async fn read_body(
    body: Body,
    limit: usize,
    why: &'static str,
    deadline: Instant,
) -> Result<Bytes, RequestError> {
    let read = async {
        let mut chunks = body.into_data_stream();
        let mut buf = BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| RequestError::BodyRead(e.to_string()))?;
            if buf.len() + chunk.len() > limit {
                return Err(RequestError::BodyTooLarge { limit, why });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or(Err(RequestError::BodyTimeout))
}

/// Client errors are the client's business (debug); server errors are logged once here,
/// inside the request's span, which carries the request id.
fn log_answer(answer: &Answer) {
    let status = answer.status.as_u16();
    let message = String::from_utf8_lossy(&answer.body);
    if answer.status == StatusCode::INTERNAL_SERVER_ERROR {
        error!(status, message = %message, "request failed");
    } else if answer.status.is_server_error() {
        warn!(status, message = %message, "request not served");
    } else {
        debug!(status, "request answered");
    }
}

/// A streaming route's answer, as Mosec sends it: 200 and `text/event-stream` as soon as
/// the request is queued, one `data:` event per event the worker sent, and the stream's
/// end; a failure at any stage (or a broken stream) is a last `event: error` whose data is
/// [`error_event`]. Dropping the body (the client went away) cancels the request.
fn sse_response(stream: ReplyStream) -> Response {
    let span = tracing::Span::current();
    let events = futures::stream::unfold(stream, move |mut stream| {
        async move {
            let event = match stream.next().await? {
                StreamItem::Event(text) => Event::default().data(String::from_utf8_lossy(&text)),
                StreamItem::End(Ok(reply)) if reply.outcome == Outcome::Ok => {
                    debug!(request = stream.request_id(), "stream ended");
                    return None;
                }
                StreamItem::End(result) => {
                    let answer = answer(result);
                    log_answer(&answer);
                    Event::default().event("error").data(error_event(&answer))
                }
            };
            Some((Ok::<_, Infallible>(event), stream))
        }
        .instrument(span.clone())
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

fn into_response(answer: Answer) -> Response {
    let content_type = HeaderValue::from_str(&answer.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static(crate::status::DEFAULT_CONTENT_TYPE));
    let mut response = (answer.status, answer.body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    if let Some(seconds) = answer.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if let Some(allow) = answer.allow {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(location) = answer.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LOCATION, location);
        response.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
    }
    response
}
