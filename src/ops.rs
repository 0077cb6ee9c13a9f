//! The ops HTTP listener: `/healthz` (alive), `/readyz` (every backend ready, with what is
//! missing in the body) and `/metrics` (Prometheus text 0.0.4, or OpenMetrics when the
//! scraper's `Accept` asks for it).

use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::State;
use crate::telemetry::Metrics;
use crate::telemetry::exposition::{OPENMETRICS_TEXT, PROMETHEUS_TEXT, wants_openmetrics};

#[derive(Clone)]
struct Ops {
    state: Arc<State>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Ops {
            state,
            metrics,
            draining,
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "ops listener failed");
    }
}

async fn readyz(AxumState(ops): AxumState<Ops>) -> impl IntoResponse {
    let mut missing = ops.state.readiness();
    if ops.draining.is_cancelled() {
        missing.push("draining".into());
    }
    let body = serde_json::json!({"ready": missing.is_empty(), "waiting_for": missing}).to_string();
    let status = if missing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics_text(AxumState(ops): AxumState<Ops>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_TEXT)],
            ops.metrics.encode(),
        )
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            ops.metrics.encode_text(),
        )
    }
}
