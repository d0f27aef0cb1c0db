//! HTTP handlers: `POST <route>` into the pipeline, `GET /` readiness, `GET /metrics`.
//!
//! Every response carries `x-request-id`, stamped by [`with_request_id`], which also opens
//! the request's span. Results go through [`crate::status::answer`] and nowhere else.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use natserve_protocol::{headers as wire, route_slug, Names, RouteRecord};
use tokio::time::Instant;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tracing::{debug, error, info_span, warn, Instrument};

use crate::config::Config;
use crate::drain::Drain;
use crate::error::RequestError;
use crate::metrics::{Metrics, UNKNOWN_ROUTE};
use crate::openapi;
use crate::routes::SharedRoutes;
use crate::status::{answer, Answer};
use crate::submit::{Reply, Submission, Submitter};

/// Name of the response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub names: Names,
    pub routes: SharedRoutes,
    pub submitter: Submitter,
    pub metrics: Metrics,
    pub drain: Drain,
}

/// The request id assigned on arrival, for handlers to read.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The ingress's HTTP surface.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(readiness))
        .route("/metrics", get(metrics))
        .route(openapi::METADATA_PATH, get(openapi_document))
        .route(openapi::SWAGGER_PATH, get(swagger))
        .fallback(serve_route)
        // gzip or zstd request bodies are decompressed before the size limit applies (a
        // small compressed bomb is still refused at the limit, 413); an unknown
        // Content-Encoding is 415. Responses are compressed when the client asks.
        .layer(RequestDecompressionLayer::new().gzip(true).zstd(true))
        .layer(CompressionLayer::new().gzip(true).zstd(true))
        .layer(middleware::from_fn(with_request_id))
        .with_state(app)
}

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
fn request_ids(caller: Option<&HeaderValue>) -> (String, String) {
    let fresh = uuid::Uuid::new_v4().simple().to_string();
    match caller.map(|v| (v, sane_caller_id(v))) {
        Some((_, Some(id))) => (format!("{id}-{}", &fresh[..8]), id.to_owned()),
        Some((given, None)) => {
            debug!(given = ?given, "caller's x-request-id is not a usable token; using a fresh one");
            (fresh.clone(), fresh)
        }
        None => (fresh.clone(), fresh),
    }
}

/// Assigns the request id, runs the request inside its span, and stamps the id on the
/// response, whichever handler (or axum itself) produced it.
async fn with_request_id(mut request: Request, next: Next) -> Response {
    let (id, echoed) = request_ids(request.headers().get(REQUEST_ID_HEADER));
    let span =
        info_span!("request", id = %id, method = %request.method(), path = %request.uri().path());
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&echoed) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn readiness(State(app): State<Arc<App>>) -> Response {
    let result = if app.drain.is_draining() {
        Err(RequestError::Draining)
    } else if !app.submitter.is_connected() {
        Err(RequestError::NotReady("nats disconnected".to_owned()))
    } else {
        let first_streams = {
            let table = app.routes.read().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            table.readiness(now).map(|()| {
                table
                    .routes(now)
                    .into_iter()
                    .map(|(slug, r)| (r.route, app.names.stream(&slug, 0)))
                    .collect::<Vec<_>>()
            })
        };
        match first_streams {
            Err(reason) => Err(RequestError::NotReady(reason)),
            Ok(streams) => app.queues_exist(streams).await,
        }
    };
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
    let batch_sizes = result.as_ref().ok().and_then(|r| r.batch_sizes.clone());
    let answer = answer(result);
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
    ) -> Result<Reply, RequestError> {
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
        let deadline = started + self.config.timeout;
        let deadline_ms = natserve_protocol::unix_ms() + self.config.timeout.as_millis() as u64;

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
        self.submitter
            .submit(Submission {
                route: &record.route,
                slug: &slug,
                request_id,
                body,
                traceparent,
                deadline,
                deadline_ms,
            })
            .await
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
    if answer.status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    response
}
