//! The agent's own small HTTP surface: `/metrics` for Prometheus and `/ready` for
//! orchestrators' health checks (200 once every hosted stage has a ready worker).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::registration::Registration;

#[derive(Clone)]
struct AppState {
    registry: Registry,
    registration: Arc<Registration>,
    draining: CancellationToken,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    registration: Arc<Registration>,
    draining: CancellationToken,
) {
    let state = AppState {
        registry,
        registration,
        draining: draining.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .with_state(state);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { draining.cancelled().await })
        .await;
}

async fn metrics(State(state): State<AppState>) -> (StatusCode, String) {
    let mut out = Vec::new();
    let families = state.registry.gather();
    match TextEncoder::new().encode(&families, &mut out) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&out).into_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    let record = state.registration.record();
    let body = serde_json::to_string(&record).unwrap_or_default();
    if state.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining".into())
    } else if state.registration.is_ready() {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
