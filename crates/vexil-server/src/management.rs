//! Management endpoints on port 8014: `/healthz` (the process is up), `/readyz` (200 when every
//! source has loaded and none has been failing for longer than the grace period, 412 otherwise, as
//! flagd answers not-ready), `/metrics` (Prometheus).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use vexil_service::{Live, Readiness};

#[derive(Debug, Clone)]
struct Management {
    live: Live,
    metrics: PrometheusHandle,
}

pub fn router(live: Live, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(Management { live, metrics })
}

async fn readyz(State(m): State<Management>) -> impl IntoResponse {
    match m.live.readiness() {
        Readiness::Ready => (StatusCode::OK, "ready".to_owned()),
        Readiness::NotLoaded { sources } => (
            StatusCode::PRECONDITION_FAILED,
            format!("not ready: sources not loaded yet: {}", sources.join(", ")),
        ),
        Readiness::Stale { source, failing_for } => (
            StatusCode::PRECONDITION_FAILED,
            format!(
                "not ready: source {source} has been failing for {}s",
                failing_for.as_secs()
            ),
        ),
    }
}

async fn render(State(m): State<Management>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.metrics.render(),
    )
}
