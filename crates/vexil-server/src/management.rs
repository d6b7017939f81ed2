//! Management endpoints on port 8014: `/healthz` (the process is up), `/readyz` (200 when every
//! source has loaded and none has been failing for longer than the grace period, 412 otherwise, as
//! flagd answers not-ready; the body names every source that is not loaded or failing, and why;
//! 503 once the server is shutting down), `/metrics` (Prometheus).

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
    draining: tokio::sync::watch::Receiver<bool>,
}

/// The management routes; `cache`: the store's change bus, whose outage `/readyz` reports (without
/// failing: evaluation goes on, and changes arrive by the database's version check); `draining`:
/// true once the server is stopping (`/readyz` answers 503 from then on).
pub fn router(
    live: Live,
    metrics: PrometheusHandle,
    cache: Option<Arc<dyn ConfigCache>>,
    draining: tokio::sync::watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(Management {
            live,
            metrics,
            cache,
            draining,
        })
}

async fn readyz(State(m): State<Management>) -> impl IntoResponse {
    if *m.draining.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down: requests are still served until the listeners close".to_owned(),
        );
    }
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
