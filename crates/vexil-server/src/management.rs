//! Management endpoints on port 8014: `/healthz` (the process is up), `/readyz` (200 when every
//! source has loaded and none has been failing for longer than the grace period, 412 otherwise, as
//! flagd answers not-ready; the body names every source that is not loaded or failing, and why),
//! `/metrics` (Prometheus).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use vexil_cache::ConfigCache;
use vexil_service::Live;

#[derive(Debug, Clone)]
struct Management {
    live: Live,
    metrics: PrometheusHandle,
    cache: Option<Arc<dyn ConfigCache>>,
}

/// The management routes; `cache`: the store's change bus, whose outage `/readyz` reports (without
/// failing: evaluation goes on, and changes arrive by the database's version check).
pub fn router(live: Live, metrics: PrometheusHandle, cache: Option<Arc<dyn ConfigCache>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(Management { live, metrics, cache })
}

async fn readyz(State(m): State<Management>) -> impl IntoResponse {
    let readiness = m.live.readiness();
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::PRECONDITION_FAILED
    };
    let mut body = readiness.to_string();
    if let Some(cache) = &m.cache {
        let health = cache.health();
        if !health.up {
            let error = health.error.unwrap_or_default();
            body.push_str(&format!(
                "\nconfig cache {}: unreachable (serving the last snapshot; changes arrive by the database's version check): {error}",
                cache.kind()
            ));
        }
    }
    (status, body)
}

async fn render(State(m): State<Management>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.metrics.render(),
    )
}
