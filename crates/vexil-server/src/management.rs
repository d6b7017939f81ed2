//! Management endpoints on port 8014: `/healthz` (the process is up), `/readyz` (200 when every
//! source has loaded and none has been failing for longer than the grace period, 412 otherwise, as
//! flagd answers not-ready; the body names every source that is not loaded or failing, and why),
//! `/metrics` (Prometheus).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use vexil_service::Live;

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
    let readiness = m.live.readiness();
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::PRECONDITION_FAILED
    };
    (status, readiness.to_string())
}

async fn render(State(m): State<Management>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.metrics.render(),
    )
}
